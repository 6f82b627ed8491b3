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


def abs_bmm(omega, a, b, alpha):
    """omega + alpha * sum_s |sum_t outer(a_st, b_st)|: per sample, the sum over positions first, then abs."""
    out = omega.to(F64).clone()
    for s in range(a.shape[0]):
        g = torch.zeros(a.shape[2], b.shape[2], dtype=F64)
        for t in range(a.shape[1]):
            g += torch.outer(a[s, t].to(F64), b[s, t].to(F64))
        out += alpha * g.abs()
    return out


# ------------------------------------------------------------ MAS importance
def _named(model):
    return dict(model.named_parameters())


def global_exact(model, xs, output_fn=lambda o: o):
    """(1/N) sum_k |d ||F(x_k)||^2 / d theta|: one sample per backward pass."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for x in xs:
        for k in range(x.shape[0]):
            out = output_fn(model(x[k:k + 1]))
            grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
            for (name, _), g in zip(params.items(), grads):
                if g is not None:
                    omega[name] += g.double().abs()
            n += 1
    return {k: v / n for k, v in omega.items()}


def global_batch(model, xs, output_fn=lambda o: o):
    """The released code: (1/N) sum_b |sum_{k in b} g_k|."""
    params = _named(model)
    omega = {n: torch.zeros_like(p, dtype=F64) for n, p in params.items()}
    n = 0
    for x in xs:
        out = output_fn(model(x))
        grads = torch.autograd.grad(out.double().pow(2).sum(), list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads):
            if g is not None:
                omega[name] += g.double().abs()
        n += x.shape[0]
    return {k: v / n for k, v in omega.items()}


def local_linear(x, y):
    """(sum_k |y_k| |x_k|^T, sum_k |y_k|) for one Linear call; rows of extra dims are positions."""
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).double()
    w = torch.zeros(y.shape[1], x.shape[1], dtype=F64)
    for r in range(x.shape[0]):
        w += torch.outer(y[r].abs(), x[r].abs())
    return w, y.abs().sum(0)


def local_conv2d(conv, x, y):
    """Hebbian rule for a Conv2d over positions, by unfold + einsum (independent of conv weight-grads)."""
    import torch.nn.functional as F

    pads = conv._reversed_padding_repeated_twice
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    xp = F.pad(x.double(), pads, mode=mode) if any(pads) else x.double()
    cols = F.unfold(xp.abs(), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (N, C*kh*kw, L)
    ya = y.double().abs().flatten(2)  # (N, O, L)
    g = conv.groups
    o_per_g, c_per_g = conv.out_channels // g, conv.in_channels // g
    kk = cols.shape[1] // conv.in_channels
    w = torch.zeros(conv.weight.shape, dtype=F64)
    for gi in range(g):
        yc = ya[:, gi * o_per_g:(gi + 1) * o_per_g]
        xc = cols[:, gi * c_per_g * kk:(gi + 1) * c_per_g * kk]
        w[gi * o_per_g:(gi + 1) * o_per_g] = torch.einsum("nol,ncl->oc", yc, xc).view(o_per_g, *w.shape[1:])
    return w, ya.sum((0, 2))
