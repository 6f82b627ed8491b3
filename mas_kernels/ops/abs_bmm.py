r"""``abs_bmm_accumulate_``: ``omega += alpha * sum_s |a_s^T @ b_s|`` in fp32 (or fp64), in place.

With ``a`` of shape (S, T, J) and ``b`` of shape (S, T, I) this is

.. math:: \Omega_{ji} \mathrel{+}= \alpha \sum_{s=1}^{S} \Big|\sum_{t=1}^{T} a_{stj}\, b_{sti}\Big|

per sample ``s`` the (J, I) matrix ``a_s^T b_s``, a sum over its positions
``t``, then its absolute value, then the sum over samples. The abs comes
*after* the sum over positions (``|sum_t x_t| != sum_t |x_t|``): this is
exact per-sample global MAS wherever one sample's gradient of a weight is a
sum over positions:

* a Linear layer on sequences: ``a = Delta`` (the per-sample gradients of
  ``||F(x)||^2`` with respect to the layer's output, (S, T, J)), ``b = X`` (its
  input, (S, T, I));
* a convolution: ``b`` = the unfolded input patches (S, L, C_in * prod(kernel)),
  ``a`` = the output gradients (S, L, C_out), T = L output positions;
* a weight used several times in one forward (tied weights, a module called
  twice): the uses concatenated along T, so their contributions add up before
  the abs.

T = 1 is ``abs_outer_accumulate_`` (``|a_s^T b_s| = |a_s|^T |b_s|`` for a
rank-one product), and every backend runs it as that op.

Scratch memory, ``memory_budget`` bytes at most (default
:data:`DEFAULT_MEMORY_BUDGET`, 256 MiB; per call with ``memory_budget=``, for
the process by assigning ``mas_kernels.ops.abs_bmm.DEFAULT_MEMORY_BUDGET``;
at least :data:`MIN_MEMORY_BUDGET`, 64 KiB). This is the package's one
definition of a memory budget: ``MAS(memory_budget=)`` (the exact rule's
per-sample scratch, passed on to this op) has the same default and is checked
by the same :func:`check_memory_budget`.

* the PyTorch path computes the per-sample products of a chunk of samples at
  once, and chunks samples, then output tiles, then positions so that its
  scratch fits (:func:`chunk_plan`; any budget >= 64 KiB works);
* the native CPU kernel (``csrc/abs_bmm.cpp``) runs a chunked bmm of about
  1 MiB of products at a time where that is faster and fits the budget (the
  products' buffer kept per thread between calls), else register tiles that
  never store per-sample products; their fixed per-thread panels (about 2 MiB
  with AVX-512) are not counted, the partial sums of
  sample groups are; at T = 1 it is the native ``abs_outer_accumulate_``,
  whose fp32 abs copies of the inputs (``4 * S * (J + I)`` bytes) are not
  chunked;
* the Triton kernel keeps per-sample tiles in registers and uses the budget
  only for the partial sums of its sample splits.
"""

from __future__ import annotations

import math
import numbers

import torch

from ._checks import ACC_DTYPES, check_not_requiring_grad, check_scalar, check_tensor, native_checks
from ._library import define, prevalidated
from .abs_outer import check_written

OP = "abs_bmm_accumulate_"

#: Bytes of scratch memory one call may use when ``memory_budget`` is not given (also ``MAS``'s default).
DEFAULT_MEMORY_BUDGET = 256 << 20
#: The smallest budget accepted: below it chunking would cost far more than it saves.
MIN_MEMORY_BUDGET = 64 << 10
#: The largest one kept (the schema's int is 64-bit; no machine has more).
_MAX_MEMORY_BUDGET = 1 << 62

_F32 = 4  # bytes per scratch element: all scratch is float32 (float64 for a float64 omega)


# ------------------------------------------------------------------ checks
def check_memory_budget(memory_budget, who: str = OP) -> int:
    """``memory_budget`` in bytes: ``None`` is :data:`DEFAULT_MEMORY_BUDGET` (read at the call); else an int
    of at least :data:`MIN_MEMORY_BUDGET` (``ValueError`` naming ``who`` and ``memory_budget`` otherwise)."""
    if memory_budget is None:
        return DEFAULT_MEMORY_BUDGET
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, numbers.Integral):
        raise ValueError(f"{who}: memory_budget must be an int (bytes) or None for the default "
                         f"({DEFAULT_MEMORY_BUDGET >> 20} MiB), got {type(memory_budget).__name__} {memory_budget!r}")
    if memory_budget < MIN_MEMORY_BUDGET:
        raise ValueError(f"{who}: memory_budget={memory_budget} bytes is below the minimum {MIN_MEMORY_BUDGET} "
                         f"({MIN_MEMORY_BUDGET >> 10} KiB) the per-sample kernels need; pass a larger budget")
    return min(int(memory_budget), _MAX_MEMORY_BUDGET)


def _check(omega, a, b, alpha, memory_budget) -> tuple[float, int]:
    check_tensor(OP, "omega", omega, dtypes=ACC_DTYPES)
    check_tensor(OP, "a", a)
    check_tensor(OP, "b", b)
    if omega.dim() != 2:
        raise ValueError(f"{OP}: omega must be 2-D (J, I), got shape {tuple(omega.shape)}")
    if a.dim() != 3:
        raise ValueError(f"{OP}: a must be 3-D (S, T, J), got shape {tuple(a.shape)}")
    if b.dim() != 3:
        raise ValueError(f"{OP}: b must be 3-D (S, T, I), got shape {tuple(b.shape)}")
    if b.shape[0] != a.shape[0]:
        raise ValueError(f"{OP}: b has {b.shape[0]} samples (dim 0) but a has {a.shape[0]}")
    if b.shape[1] != a.shape[1]:
        raise ValueError(f"{OP}: b has {b.shape[1]} positions (dim 1) but a has {a.shape[1]}")
    if omega.shape != (a.shape[2], b.shape[2]):
        raise ValueError(f"{OP}: omega has shape {tuple(omega.shape)} but a_s^T @ b_s has shape "
                         f"({a.shape[2]}, {b.shape[2]})")
    for name, t in (("a", a), ("b", b)):
        if t.device != omega.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but omega is on {omega.device}")
    check_not_requiring_grad(OP, "omega", omega)
    alpha = check_scalar(OP, "alpha", alpha, nonnegative=True)
    memory_budget = check_memory_budget(memory_budget)
    check_written(OP, omega, a, b)
    return alpha, memory_budget


def guard(omega, a, b, alpha, memory_budget) -> None:
    """Everything ``abs_bmm_accumulate_`` checks, in front of every kernel (see ``_library``), before any
    write (in C++ where the native extension is built: the same checks, see ``_checks``)."""
    native = native_checks()
    if native is not None:
        native.guard_abs_bmm(omega, a, b, alpha, memory_budget)
        return
    _check(omega, a, b, alpha, memory_budget)


# ---------------------------------------------------------- the chunk plan
def chunk_plan(S: int, T: int, J: int, I: int, memory_budget: int,
               itemsize: int = _F32) -> tuple[int, int, int, int]:
    """``(samples, positions, rows, cols)`` per chunk of the PyTorch path, such that its scratch fits.

    The scratch of one chunk is copies of the chunk's ``a`` and ``b`` in
    omega's dtype (``itemsize`` bytes per element: 4, or 8 for float64), its
    per-sample products and their sum over samples:
    ``itemsize * (s * t * (rows + cols) + (s + 1) * rows * cols)`` bytes (see
    :func:`chunk_bytes`). Whole samples are preferred; when one does not fit,
    the output is tiled (square-ish tiles); when a tile with all positions
    does not fit either, positions are chunked too (products of position
    chunks are added before the abs, so the result does not change).
    """
    budget = memory_budget // itemsize  # in elements
    one = T * (J + I) + 2 * J * I
    if one <= budget:
        # (s + 1) * J * I for the sum: solve s*T*(J+I) + (s+1)*J*I <= budget for s.
        return min(S, max(1, (budget - J * I) // (T * (J + I) + J * I))), T, J, I
    # One sample does not fit: tile the output, all positions per tile. A square x-by-x tile
    # needs 2*T*x + 2*x^2 <= budget; a dim smaller than x leaves the other one more room.
    x = int((math.sqrt(4 * T * T + 8 * budget) - 2 * T) / 4)
    if x >= 16:
        rows = min(J, x)
        cols = min(I, (budget - T * rows) // (T + 2 * rows))
        rows = min(J, (budget - T * cols) // (T + 2 * cols))
        return 1, T, rows, cols
    # Not even a 16 x 16 tile with all positions: a quarter of the budget per tile (product
    # and sum), the rest for a chunk of positions.
    x = max(1, math.isqrt(budget // 4))
    rows, cols = min(J, x), min(I, x)
    return 1, min(T, (budget - 2 * rows * cols) // (rows + cols)), rows, cols


def chunk_bytes(samples: int, positions: int, rows: int, cols: int, itemsize: int = _F32) -> int:
    """Scratch bytes of one chunk of the PyTorch path (what :func:`chunk_plan` keeps within the budget)."""
    return itemsize * (samples * positions * (rows + cols) + (samples + 1) * rows * cols)


# ------------------------------------------------------------- PyTorch path
def _abs_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``|x|`` as a new ``dtype`` tensor, allocating only that (no 16-bit temporary)."""
    return x.abs() if x.dtype == dtype else x.to(dtype).abs_()


def _abs_outer_chunked(omega, a, b, alpha, memory_budget) -> None:
    """T = 1: ``|a_s^T b_s| = |a_s|^T |b_s|``, one ``addmm_`` per chunk of samples on abs copies."""
    S, J, I = a.shape[0], a.shape[1], b.shape[1]
    step = max(1, memory_budget // (omega.element_size() * (J + I)))
    for s0 in range(0, S, step):
        omega.addmm_(_abs_as(a[s0:s0 + step], omega.dtype).t(), _abs_as(b[s0:s0 + step], omega.dtype), alpha=alpha)


def abs_bmm_torch(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, memory_budget: int) -> None:
    """The readable definition: per chunk, ``bmm`` of the samples' ``a_s^T`` and ``b_s`` in omega's dtype
    (float32, or float64), abs, sum.

    Chunks come from :func:`chunk_plan`, so the scratch stays within
    ``memory_budget`` bytes.
    """
    S, T, J = a.shape
    I = b.shape[2]
    if omega.numel() == 0 or S == 0 or T == 0:
        return
    if T == 1:
        _abs_outer_chunked(omega, a[:, 0], b[:, 0], alpha, memory_budget)
        return
    ns, nt, nj, ni = chunk_plan(S, T, J, I, memory_budget, omega.element_size())
    dtype = omega.dtype
    for j0 in range(0, J, nj):
        for i0 in range(0, I, ni):
            out = omega[j0:j0 + nj, i0:i0 + ni]
            for s0 in range(0, S, ns):
                prod = None
                for t0 in range(0, T, nt):
                    # (s, rows, t) @ (s, t, cols): the chunk's per-sample a_s^T b_s in omega's dtype.
                    x = a[s0:s0 + ns, t0:t0 + nt, j0:j0 + nj].to(dtype).transpose(1, 2)
                    y = b[s0:s0 + ns, t0:t0 + nt, i0:i0 + ni].to(dtype)
                    prod = torch.bmm(x, y) if prod is None else prod.baddbmm_(x, y)
                    del x, y
                out.add_(prod.abs_().sum(0), alpha=alpha)
                del prod


def _fake(omega, a, b, alpha, memory_budget) -> None:
    return None


define("abs_bmm_accumulate_(Tensor(a!) omega, Tensor a, Tensor b, float alpha, int memory_budget) -> ()", _fake,
       {"torch": f"{__name__}:abs_bmm_torch", "triton": "mas_kernels.ops.triton.abs_bmm:abs_bmm_triton"},
       guard=guard, mutated=(0,))


def abs_bmm_accumulate_(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, *,
                        memory_budget: int | None = None) -> torch.Tensor:
    r"""``omega += alpha * sum_s |a_s^T @ b_s|`` in place; returns ``omega``.

    Args:
        omega: (J, I) float32 or float64, updated in place (any strides whose elements are distinct).
        a: (S, T, J) float32/float16/bfloat16/float64, any strides; e.g. per-sample output
            gradients of a layer, T positions per sample.
        b: (S, T, I) float32/float16/bfloat16/float64, any strides; e.g. the layer's inputs.
        alpha: scale (>= 0), e.g. ``1/N`` for a mean over samples.
        memory_budget: bytes of scratch memory the call may use (default
            :data:`DEFAULT_MEMORY_BUDGET`, 256 MiB; at least 64 KiB). The PyTorch path
            chunks samples, output tiles and positions to stay within it.

    Per sample, the product is summed over positions before the abs, in
    omega's dtype (float32 whatever the input dtype, or float64). Not differentiable (no autograd graph is
    recorded). Raises ``ValueError`` naming the argument on a shape, dtype or
    device mismatch, when ``omega`` requires grad with grad mode on, shares
    memory with ``a`` or ``b``, has overlapping elements (stride 0, or an
    overlapping ``as_strided`` view) or is an inference tensor outside
    ``torch.inference_mode()``, when ``alpha`` is negative or not finite in
    float32, or on a bad ``memory_budget``, before ``omega`` is touched; the
    same on every backend and through ``torch.ops.mas_kernels.abs_bmm_accumulate_``.
    """
    alpha, memory_budget = _check(omega, a, b, alpha, memory_budget)
    if omega.numel() == 0 or a.shape[0] == 0 or a.shape[1] == 0:
        return omega
    prevalidated(torch.ops.mas_kernels.abs_bmm_accumulate_, omega, a, b, alpha, memory_budget)
    return omega
