r"""``abs_outer_accumulate_``: ``omega += alpha * |a|^T @ |b|`` in fp32 (or fp64), in place.

With ``a`` of shape (N, J) and ``b`` of shape (N, I) this is

.. math:: \Omega_{ji} \mathrel{+}= \alpha \sum_{k=1}^{N} |a_{kj}|\,|b_{ki}|

the sum over samples of the outer products of the absolute values. It serves

* local / Hebbian MAS for a Linear layer: ``a = Y`` (outputs), ``b = X`` (inputs),
  ``alpha = 1/N``;
* exact per-sample global MAS for a Linear layer on 2-D inputs: ``a = Delta``
  (per-sample output gradients of ``||F(x)||^2``), ``b = X``: per sample the
  weight gradient is the rank-one ``delta_k x_k^T`` whose absolute value is
  ``|delta_k| |x_k|^T``.
"""

from __future__ import annotations

import torch

from ._checks import (ACC_DTYPES, check_no_overlap, check_not_requiring_grad, check_output, check_scalar, check_tensor,
                      native_checks)
from ._library import define, prevalidated

OP = "abs_outer_accumulate_"


def _check(omega, a, b, alpha) -> float:
    check_tensor(OP, "omega", omega, dtypes=ACC_DTYPES)
    check_tensor(OP, "a", a)
    check_tensor(OP, "b", b)
    if omega.dim() != 2 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(
            f"{OP}: omega, a and b must be 2-D, got omega{tuple(omega.shape)}, a{tuple(a.shape)}, b{tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{OP}: a has {a.shape[0]} rows (samples) but b has {b.shape[0]}")
    if omega.shape != (a.shape[1], b.shape[1]):
        raise ValueError(
            f"{OP}: omega has shape {tuple(omega.shape)} but a^T @ b has shape ({a.shape[1]}, {b.shape[1]})"
        )
    for name, t in (("a", a), ("b", b)):
        if t.device != omega.device:
            raise ValueError(f"{OP}: {name} is on {t.device} but omega is on {omega.device}")
    check_not_requiring_grad(OP, "omega", omega)
    alpha = check_scalar(OP, "alpha", alpha, nonnegative=True)
    check_written(OP, omega, a, b)
    return alpha


def check_written(op: str, omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``omega`` can be written while ``a`` and ``b`` are read (``abs_outer`` and ``abs_bmm``): see
    :func:`check_output`, and no memory shared with an input (a tiled kernel would read elements it
    already overwrote), not even as the same view."""
    check_output(op, "omega", omega)
    check_no_overlap(op, "omega", [omega], [("a", [a]), ("b", [b])], elementwise=False, index=False)


def guard(omega, a, b, alpha) -> None:
    """Everything ``abs_outer_accumulate_`` checks, in front of every kernel (see ``_library``), before any
    write (in C++ where the native extension is built: the same checks, see ``_checks``)."""
    native = native_checks()
    if native is not None:
        native.guard_abs_outer(omega, a, b, alpha)
        return
    _check(omega, a, b, alpha)


def abs_outer_torch(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """The readable definition (and CPU fallback): one ``addmm_`` on abs copies in omega's dtype."""
    omega.addmm_(a.abs().t().to(omega.dtype), b.abs().to(omega.dtype), alpha=alpha)


def _fake(omega, a, b, alpha) -> None:
    return None


define("abs_outer_accumulate_(Tensor(a!) omega, Tensor a, Tensor b, float alpha) -> ()", _fake,
       {"torch": f"{__name__}:abs_outer_torch", "triton": "mas_kernels.ops.triton.abs_outer:abs_outer_triton"},
       guard=guard, mutated=(0,))


def abs_outer_accumulate_(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    r"""``omega += alpha * |a|^T @ |b|`` in place; returns ``omega``.

    Args:
        omega: (J, I) float32 or float64, updated in place (any strides).
        a: (N, J) float32/float16/bfloat16/float64, any strides (e.g. a transposed view).
        b: (N, I) float32/float16/bfloat16/float64, any strides.
        alpha: scale (>= 0), e.g. ``1/N`` for a mean over samples.

    The products are accumulated in omega's dtype (float32 whatever the input
    dtype, or float64).
    Not differentiable (no autograd graph is recorded). Raises ``ValueError``
    (naming the argument) before ``omega`` is touched, the same on every
    backend and through ``torch.ops.mas_kernels.abs_outer_accumulate_``: on a shape, dtype or device mismatch; when ``omega`` requires
    grad with grad mode on; when ``omega`` shares memory with ``a`` or ``b``
    or with itself (an expanded or overlapping view); when ``omega`` is an
    inference tensor outside ``torch.inference_mode()``; when ``alpha`` is
    negative, not finite or overflows float32.
    """
    alpha = _check(omega, a, b, alpha)
    if omega.numel() == 0 or a.shape[0] == 0:
        return omega
    prevalidated(torch.ops.mas_kernels.abs_outer_accumulate_, omega, a, b, alpha)
    return omega
