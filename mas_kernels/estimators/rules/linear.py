r"""Linear layers: ``nn.Linear`` (``y = x W^T + b``) and transformers' ``Conv1D`` (``y = x W + b``).

Per sample k, with positions t of the sample (sequence, or none):
``g_W = sum_t delta_kt x_kt^T`` (``W`` of shape (J, I)), ``g_b = sum_t delta_kt``.
Exact: ``sum_k |g_W|`` is one ``abs_bmm`` over (N, T, J) x (N, T, I), and
``abs_outer`` when T = 1 (a 2-D input); the calls of a layer called several
times are concatenated along T, which sums their contributions per sample
before the absolute value. Local: ``sum |y| |x|^T`` over every row.
"""

from __future__ import annotations

import torch
from ...ops import abs_bmm_accumulate_, abs_outer_accumulate_
from ..capture import Call
from .base import Rule, batched, sample_dim


def _factors(calls: list[Call], ctx, layer) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, x)`` of every call as (N, T, J) and (N, T, I), concatenated along T."""
    deltas, xs = [], []
    for call in calls:
        x = call.x
        dim = sample_dim(x, ctx, 1, layer)
        xs.append(batched(x.detach(), ctx.n, 1, dim))
        deltas.append(batched(call.delta, ctx.n, 1, dim))
    if len(calls) == 1:
        return deltas[0], xs[0]
    return torch.cat(deltas, 1), torch.cat(xs, 1)


def _bias(acc: torch.Tensor, delta: torch.Tensor) -> None:
    acc.add_(delta.float().sum(1).abs().sum(0))


class LinearRule(Rule):
    """``nn.Linear``: weight (J, I), bias (J)."""

    transposed = False  # Conv1D keeps W as (I, J)

    def reads(self, layer, x):
        return None if x.dim() == 1 else super().reads(layer, x)

    def exact(self, layer, calls, ctx, accs):
        if not calls:
            return
        delta, x = _factors(calls, ctx, layer)
        if "weight" in accs:
            a, b = (x, delta) if self.transposed else (delta, x)
            abs_bmm_accumulate_(accs["weight"], a, b, memory_budget=ctx.budget)  # T = 1: the abs_outer GEMM
        if "bias" in accs:
            _bias(accs["bias"], delta)

    def factors(self, layer, calls, ctx, attr):
        if attr != "weight" or not calls:
            return None
        delta, x = _factors(calls, ctx, layer)
        return (x, delta) if self.transposed else (delta, x)

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        delta, x = _factors(calls, ctx, layer)
        delta, x = delta[lo:hi].float(), x[lo:hi].float()
        out = {}
        if "weight" in attrs:
            out["weight"] = x.transpose(1, 2) @ delta if self.transposed else delta.transpose(1, 2) @ x
        if "bias" in attrs:
            out["bias"] = delta.sum(1)
        return out

    def local(self, layer, call, accs):
        x, y = call.x.detach(), call.outputs[0].detach()
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        if "weight" in accs:
            if self.transposed:
                abs_outer_accumulate_(accs["weight"], x2, y2)
            else:
                abs_outer_accumulate_(accs["weight"], y2, x2)
        if "bias" in accs:
            accs["bias"].add_(y2.abs().sum(0, dtype=torch.float32))


class Conv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W (I, J)."""

    transposed = True
