r"""Convolutions ``nn.Conv1d/2d/3d`` (any stride, dilation, groups, padding mode).

Per sample k, with output positions l and the input patch ``p_kl`` that
position l sees (``C/groups * prod(kernel)`` values per group):
``g_W[group] = sum_l delta_kl p_kl^T``, ``g_b = sum_l delta_kl``. Exact:
the patches come from the padded input (the layer's own padding mode), and
``sum_k |g_W|`` is formed by one of three strategies chosen per call by shape
(``conv_exact.py``: unfolded patches + ``abs_bmm``, a weight-gradient
convolution with the samples as groups, or the native implicit GEMM per
sample), within the memory budget. Local: the weight-gradient of a
convolution with input ``|x|`` and output-gradient ``|y|`` (``|pad(x)| =
pad(|x|)`` for every padding mode).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..reduction import AbsReduction
from .base import Rule, work_dtype
from .conv_exact import conv_weight_abs_sum_, padded, unfolded

_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, L, C*K): for each output position, the input values its kernel sees (C-major, as in the weight)."""
    return unfolded(module, padded(module, x))


def _batched(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    nd = len(module.kernel_size)
    return t.unsqueeze(0) if t.dim() == nd + 1 else t  # an unbatched sample


class ConvRule(Rule):
    """``nn.Conv1d/2d/3d``: weight (O, C/groups, *kernel), bias (O)."""

    eager = True

    def unbatched(self, layer, x):
        return x.dim() == len(layer.module.kernel_size) + 1

    def accepts(self, layer, dims):
        return dims.known and dims.x in (0, None) and dims.out in (0, None)

    def feature_dims(self, layer, x):
        return x.dim() - 1

    def exact(self, layer, calls, ctx, accs):
        module = layer.module
        calls = [c for c in calls if c.deltas[0] is not None]
        if not calls:
            return
        if len(calls) > 1:  # a conv called several times: its contributions summed per sample
            return super().exact(layer, calls, ctx, accs)
        x = _batched(module, calls[0].x.detach())
        delta = _batched(module, calls[0].delta)
        n = x.shape[0]
        if n != ctx.n:
            raise ValueError(f"MAS: layer {layer.name!r} got an input of shape {tuple(calls[0].x.shape)} in a "
                             f"batch of {ctx.n} samples; a convolution's samples must be its dim 0")
        dt = next(iter(accs.values())).dtype
        if "bias" in accs:
            ctx.reduce.dense_(accs["bias"], delta.to(dt).flatten(2).sum(2))
        if "weight" not in accs:
            return
        if isinstance(ctx.reduce, AbsReduction) and accs["weight"].dtype == torch.float32:
            # MAS's reduction in float32: the fastest strategy for the shape (conv_exact.py)
            conv_weight_abs_sum_(accs["weight"], x, delta, module, ctx.budget)
            return
        w = module.weight
        g, o = module.groups, w.shape[0]
        ck = w[0].numel()  # C/groups * K
        positions = delta[0, 0].numel()
        # Half the budget for a chunk's patches, half for the per-sample products abs_bmm forms from them.
        half = dataclasses.replace(ctx, budget=max(1 << 16, ctx.budget // 2))
        step = self.chunk(module, half, 4 * positions * (ck * g + o) + (4 * w.numel() if g > 1 else 0))
        omega = accs["weight"].view(g, o // g, ck)
        for lo in range(0, n, step):
            cols = patches(module, x[lo:lo + step].to(dt))  # (n, L, C*K)
            d = delta[lo:lo + step].to(dt).flatten(2).transpose(1, 2)  # (n, L, O)
            if g == 1:
                ctx.reduce.bmm_(omega[0], d, cols, half.budget)
            else:
                per = torch.einsum("nlgo,nlgc->ngoc", d.unflatten(2, (g, o // g)), cols.unflatten(2, (g, ck)))
                ctx.reduce.dense_(omega, per)

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        module = layer.module
        w = module.weight
        g, o = module.groups, w.shape[0]
        dt = work_dtype(w)
        out = {a: torch.zeros((hi - lo, *getattr(module, a).shape), device=w.device, dtype=dt) for a in attrs}
        for call in calls:
            if call.deltas[0] is None:
                continue
            x = _batched(module, call.x.detach())[lo:hi].to(dt)
            delta = _batched(module, call.delta)[lo:hi].to(dt)
            if "bias" in attrs:
                out["bias"] += delta.flatten(2).sum(2)
            if "weight" in attrs:
                cols = patches(module, x)
                d = delta.flatten(2).transpose(1, 2)
                per = torch.einsum("nlgo,nlgc->ngoc", d.unflatten(2, (g, o // g)), cols.unflatten(2, (g, w[0].numel())))
                out["weight"] += per.reshape(hi - lo, *w.shape)
        return out

    def local(self, layer, call, accs):
        module = layer.module
        nd = len(module.kernel_size)
        x, y = _batched(module, call.x.detach()), _batched(module, call.outputs[0].detach())
        dt = next(iter(accs.values())).dtype
        xa = padded(module, x.abs().to(dt))
        ya = y.abs().to(dt)
        if "weight" in accs:
            accs["weight"].add_(_CONV_WEIGHT[nd](xa, module.weight.shape, ya, module.stride, 0, module.dilation,
                                                 module.groups))
        if "bias" in accs:
            accs["bias"].add_(ya.sum(dim=[d for d in range(ya.dim()) if d != 1]))
