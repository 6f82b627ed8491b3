"""The oracle: the formulas of the paper and of the ops, literally, in float64.

Naive per-sample and per-element loops, written independently of
``mas_kernels`` (nothing here imports it). Slow on purpose; keep inputs small.
"""

from __future__ import annotations

import torch

F64 = torch.float64


# ---------------------------------------------------------------- the three ops
def abs_outer(omega, a, b, alpha):
    """omega + alpha * sum_k outer(|a_k|, |b_k|), one sample at a time."""
    out = omega.to(F64).clone()
    for k in range(a.shape[0]):
        out += alpha * torch.outer(a[k].to(F64).abs(), b[k].to(F64).abs())
    return out


def abs_accumulate(omegas, tensors, alpha):
    return [o.to(F64) + alpha * t.to(F64).abs() for o, t in zip(omegas, tensors)]


def penalty_and_grads(params, anchors, omegas, lam, grads):
    """(value, new grads): lam * sum Omega (p - a)^2 and grad + 2 lam Omega (p - a)."""
    value = torch.zeros((), dtype=F64)
    new_grads = []
    for p, a, o, g in zip(params, anchors, omegas, grads):
        d = p.to(F64) - a.to(F64)
        value += (o.to(F64) * d * d).sum()
        new_grads.append(g.to(F64) + 2.0 * lam * o.to(F64) * d)
    return lam * value, new_grads
