r"""The exact rule's convolution weights: ``omega += sum_k |g_k|``, three ways, chosen per layer call by shape.

For sample k of a convolution with groups, output channel o of group g and
patch element j (input channel c of the group, kernel offset q, C-major as in
the weight), over the output positions l:

.. math:: g_k[g, o, j] = \sum_l \delta_{k, gO_g + o, l}\, x^{pad}_{k, gC_g + c, \mathrm{pos}(l, q)}

the abs taken after the sum over positions. The strategies (all exact to
float32 rounding; each keeps its scratch within ``budget`` bytes):

* ``"unfold"``: the batch's patches (N, L, C*K) unfolded, then one
  ``abs_bmm_accumulate_`` per group (its register tiles never store the
  per-sample products; samples chunked so the patches fit the budget). Best
  where positions are few and per-sample products large (deep, narrow layers).
* ``"grouped"``: one weight-gradient convolution with the samples as groups
  (``aten.convolution_backward`` with ``groups = N * groups`` on the input
  seen as one sample of ``N*C`` channels): every per-sample gradient at once
  (N x the weight, chunked by the budget), then abs and the sum over samples.
  Best at very few channels per group (depthwise).
* ``"native"`` (CPU, the native extension): an implicit GEMM per sample
  (``csrc/conv_exact.cpp``): each sample's patches gathered into a buffer
  that stays in cache, one BLAS call per chunk of samples, abs while the
  products are in cache. No unfolded batch: it reads the input about once.
  Where the output rows are wide enough (widened by the kernel's reach at
  most 1.5x), each sample's padded input is cut into its stride phases and a
  patch row is one contiguous copy per output plane (no per-row gather).

:func:`choose` picks one from :data:`CROSSOVER`, a table measured on the
machine named there (``python -m bench --only conv_exact`` measures it
again). Off the CPU the table was not measured: grouped convolutions take
``"grouped"`` (one cuDNN call, where ``"unfold"`` would run one ``abs_bmm``
per group), the others ``"unfold"`` (the Triton ``abs_bmm``), as before.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ... import _backend, _native
from ...ops import abs_bmm_accumulate_

STRATEGIES = ("unfold", "grouped", "native")

#: Which strategy the exact rule runs for a CPU convolution, by shape: the first row whose bounds hold wins
#: (a bound left out: none). Keys: ``groups``, ``cg`` input channels per group, ``k`` kernel elements, ``l``
#: output positions per sample. Made by ``python -m bench --only conv_exact`` (``OMP_NUM_THREADS=1``, 2-core
#: Xeon with AVX-512, torch 2.13, the machine shared: load average 3-4; ``--timer cpu``;
#: ``bench/results/importance_cnn_cpu_t1.txt``), time over the batch weight gradient of the same layer,
#: unfold / grouped / native (the native kernel with its shifted-rows layout; before it, native was
#: 0.73 / 1.97 / 3.03 / 1.44 / 1.27 / 2.02 / 6.48 / 4.63 on these rows, load 7-8):
#:
#: ====================================  =====  =====  =====
#: N=32 20->20 32x32 k3                  2.64   1.50   0.60
#: N=32 80->80 8x8 k3                    3.32   3.44   1.49
#: N=32 160->160 4x4 k3                  2.41   17.8   2.68
#: N=16 16->16 32x32 k3                  6.39   1.58   1.21
#: N=16 64->64 32x32 k3                  3.90   1.33   1.08
#: N=16 256->256 8x8 k3                  2.28   8.10   2.26
#: N=32 64->64 16x16 k3 depthwise        12.3   1.87   1.51
#: N=32 64->64 16x16 k3 groups 4         7.58   1.85   1.56
#: ====================================  =====  =====  =====
#:
#: (the native kernel is the fastest of the three on 18 of the 20 ungrouped shapes measured, 0.5-2.3x the
#: weight gradient; unfold at 4x4 outputs and on one 8x8 stride-2 row, within 2%). Grouped convolutions: in
#: this run native also beat grouped on all three grouped rows (by 7-20%, one run), where the gather's tiny
#: GEMM per sample and group lost 2.5-3.5x before; the table keeps grouped for them until measured again.
CROSSOVER: tuple[dict, ...] = (
    dict(strategy="grouped", groups_min=2),
    dict(strategy="unfold", l_max=16),  # 4x4 outputs and fewer: abs_bmm's register tiles on long products
    dict(strategy="native"),
)


def _bounds_hold(row: dict, groups: int, k: int, cg: int, l: int) -> bool:
    for key, value in (("groups", groups), ("k", k), ("cg", cg), ("l", l)):
        lo, hi = row.get(f"{key}_min"), row.get(f"{key}_max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            return False
    return True


def _native_runs(device: torch.device) -> bool:
    """Whether the native kernels serve ``device`` (CPU, built, and the backend in use is ``native``)."""
    return device.type == "cpu" and _backend.choose(device) == "native"


def _native_fits(module: nn.Module, budget: int) -> bool:
    """Whether the native kernel's least scratch (an accumulator and a product of the weight's size, and one
    position's patch column; its bound is half the budget per thread) fits ``budget``."""
    w = module.weight
    return 4 * (2 * w.numel() + module.in_channels * math.prod(module.kernel_size)) <= budget // 2


def choose(module: nn.Module, x: torch.Tensor, delta: torch.Tensor, budget: int | None = None) -> str:
    """The strategy :data:`CROSSOVER` gives this call (``"unfold"`` off CPU; ``"unfold"`` where the table says
    ``"native"`` but the native kernels do not serve the CPU, not built or another backend chosen, or its least
    scratch exceeds ``budget``; off the CPU, ``"grouped"`` for grouped convolutions, else ``"unfold"``)."""
    if x.device.type != "cpu":
        return "grouped" if module.groups > 1 else "unfold"
    k = math.prod(module.kernel_size)
    cg = module.in_channels // module.groups
    l = delta[0, 0].numel()
    for row in CROSSOVER:
        if _bounds_hold(row, module.groups, k, cg, l):
            if row["strategy"] == "native" and not (
                    _native_runs(x.device) and (budget is None or _native_fits(module, budget))):
                return "unfold"
            return row["strategy"]
    return "unfold"


def padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as the layer pads it (its padding mode); ``x`` itself without padding."""
    pads = module._reversed_padding_repeated_twice
    if not any(pads):
        return x
    if module.padding_mode == "zeros":
        return F.pad(x, pads)
    return F.pad(x, pads, mode=module.padding_mode)


def unfolded(module: nn.Module, xp: torch.Tensor) -> torch.Tensor:
    """(N, L, C*K): the patches of the padded input ``xp``, C-major as in the weight (a transposed view of
    ``F.unfold``'s im2col for 2-D convolutions, a strided gather otherwise)."""
    n, c = xp.shape[:2]
    if len(module.kernel_size) == 2:
        return F.unfold(xp, module.kernel_size, dilation=module.dilation, stride=module.stride).transpose(1, 2)
    nd = len(module.kernel_size)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        xp = xp.unfold(2 + i, (k - 1) * d + 1, s)
        if d > 1:
            xp = xp[..., ::d]
    perm = [0] + list(range(2, 2 + nd)) + [1] + list(range(2 + nd, 2 + 2 * nd))
    return xp.permute(perm).reshape(n, -1, c * math.prod(module.kernel_size))


def _by_unfold(omega: torch.Tensor, xp: torch.Tensor, delta: torch.Tensor, module: nn.Module, budget: int) -> None:
    n, g = xp.shape[0], module.groups
    o = omega.shape[0]
    og, ck = o // g, omega[0].numel()
    positions = delta[0, 0].numel()
    half = max(1 << 16, budget // 2)  # half for a chunk's patches, half for abs_bmm's scratch
    step = max(1, min(n, half // (4 * positions * (ck * g + o))))
    # omega in another memory format (a channels-last weight's numerators) through a contiguous temporary
    out = omega if omega.is_contiguous() else torch.zeros_like(omega, memory_format=torch.contiguous_format)
    om = out.view(g, og, ck)
    for lo in range(0, n, step):
        cols = unfolded(module, xp[lo:lo + step].float())  # (n, L, C*K)
        d = delta[lo:lo + step].float().flatten(2).transpose(1, 2)  # (n, L, O)
        for gi in range(g):
            abs_bmm_accumulate_(om[gi], d[..., gi * og:(gi + 1) * og], cols[..., gi * ck:(gi + 1) * ck],
                                memory_budget=half)
    if out is not omega:
        omega.add_(out)


def _by_grouped(omega: torch.Tensor, xp: torch.Tensor, delta: torch.Tensor, module: nn.Module, budget: int) -> None:
    n, c = xp.shape[:2]
    o, g = delta.shape[1], module.groups
    w = omega.numel()
    nd = len(module.kernel_size)
    # Per sample: its gradient (the weight's size) and fp32 copies of its input and output gradient.
    per_sample = 4 * (w + xp[0].numel() + delta[0].numel())
    step = max(1, min(n, budget // per_sample))
    for lo in range(0, n, step):
        m = min(step, n - lo)
        x1 = xp[lo:lo + m].float().reshape(1, m * c, *xp.shape[2:])
        d1 = delta[lo:lo + m].float().reshape(1, m * o, *delta.shape[2:])
        shape = (m * o, c // g, *module.kernel_size)
        grads = torch.ops.aten.convolution_backward(
            d1, x1, d1.new_empty(1).expand(shape), None, module.stride, [0] * nd, module.dilation, False,
            [0] * nd, m * g, (False, True, False))[1]
        omega.add_(grads.view(m, w).abs_().sum(0).view_as(omega))


def _native_args(module: nn.Module) -> tuple:
    """The native kernel's geometry of ``module`` as 3-D (leading dims of size 1): ``(lead, kernel, stride,
    dilation, front padding, whether the input is padded first)`` (the kernel pads zeros itself)."""
    nd = len(module.kernel_size)
    lead = (1,) * (3 - nd)
    pads = module._reversed_padding_repeated_twice  # (last dim's before, after, ...)
    zeros = module.padding_mode == "zeros"
    front = tuple(pads[2 * (nd - 1 - i)] for i in range(nd)) if zeros else (0,) * nd
    return (lead, lead + tuple(module.kernel_size), lead + tuple(module.stride), lead + tuple(module.dilation),
            (0,) * len(lead) + front, not zeros)


def _by_native(omega: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, module: nn.Module, budget: int,
               args: tuple | None = None) -> None:
    lead, kernel, stride, dilation, front, pad_first = args or _native_args(module)
    if pad_first:
        x = padded(module, x)
    x5 = x.float().contiguous().reshape(*x.shape[:2], *lead, *x.shape[2:])
    d5 = delta.float().contiguous().reshape(*delta.shape[:2], *lead, *delta.shape[2:])
    out = omega if omega.is_contiguous() else torch.zeros_like(omega, memory_format=torch.contiguous_format)
    _native.lib().conv_weight_abs_sum_(out, x5, d5, kernel, stride, dilation, front, module.groups, 1.0, budget)
    if out is not omega:
        omega.add_(out)


_RUN = {"unfold": _by_unfold, "grouped": _by_grouped, "native": _by_native}
#: module -> {(shapes, dtype, device, budget, backend): (strategy, native args)}: conv_weight_abs_sum_'s choices
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def conv_weight_abs_sum_(omega: torch.Tensor, x: torch.Tensor, delta: torch.Tensor, module: nn.Module,
                         budget: int, strategy: str | None = None) -> torch.Tensor:
    r"""``omega += sum_k |g_k|``: the exact rule's numerator of a convolution's weight, in place.

    Args:
        omega: float32, the weight's shape (O, C/groups, *kernel).
        x: the layer's input (N, C, *spatial), any float dtype.
        delta: the gradient w.r.t. its output (N, O, *out_spatial).
        module: the ``nn.Conv1d/2d/3d`` (its stride, padding and padding mode, dilation, groups).
        budget: bytes of scratch the call may hold at once (beyond fp32 copies of ``x`` and ``delta`` where they
            are not fp32 and contiguous; ``"grouped"`` holds at least one sample's gradient, ``"native"``
            raises a ``RuntimeError`` naming ``memory_budget`` when one sample's product does not fit).
        strategy: ``"unfold"``, ``"grouped"`` or ``"native"``; None: :func:`choose`.
    """
    args = None  # the native kernel's geometry, kept with the layer's choice
    if strategy is None:
        # The layer's choice and the native kernel's geometry, once per input shape (the rule runs per layer
        # inside the backward, where each Python step costs several times its warm cost: ~60 us per call for
        # choose() in the small CNN's pass).
        key = (x.shape, delta.shape, x.dtype, x.device, budget, _backend.current(), _backend.choose(x.device))
        plans = _PLANS.get(module)
        if plans is None:
            plans = _PLANS[module] = {}
        plan = plans.get(key)
        if plan is None:
            if len(plans) > 16:  # shapes that keep changing: the recent ones
                plans.clear()
            got = choose(module, x, delta, budget)
            plan = plans[key] = (got, _native_args(module) if got == "native" else None)
        strategy, args = plan
    elif strategy not in _RUN:
        raise ValueError(f"conv_weight_abs_sum_: strategy must be one of {STRATEGIES} or None, got {strategy!r}")
    elif strategy == "native" and (x.device.type != "cpu" or not _native.built()):
        raise ValueError("conv_weight_abs_sum_: strategy='native' needs CPU tensors and the native extension "
                         f"({_native.load_error() or 'tensors on ' + str(x.device)})")
    if x.shape[0] and delta[0].numel():
        if strategy == "native":  # it pads zeros itself
            _RUN[strategy](omega, x, delta, module, int(budget), args)
        else:
            _RUN[strategy](omega, padded(module, x), delta, module, int(budget))
    return omega
