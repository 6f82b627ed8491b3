r"""Linear layers: ``nn.Linear`` (``y = x W^T + b``) and transformers' ``Conv1D`` (``y = x W + b``).

Per sample k, with positions t of the sample (sequence, or none):
``g_W = sum_t delta_kt x_kt^T`` (``W`` of shape (J, I)), ``g_b = sum_t delta_kt``.
Exact: ``sum_k r(g_W)`` is one ``abs_bmm`` over (N, T, J) x (N, T, I) (the
abs-GEMM when T = 1); the calls of a layer called several times are
concatenated along T, which sums their contributions per sample before the
absolute value. Where each call keeps its samples (any dim, a flattened
``(N*T, I)``, or one unbatched sample) is what the probe observed. Local:
``sum |y| |x|^T`` over every row.
"""

from __future__ import annotations

import torch

from ..capture import Call
from ..layout import batched
from .base import Rule, abs_outer_, cat_uses, native_fits, native_lib, native_sums, unit_rows, work_dtype


def _factors(calls: list[Call], ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """``(delta, x)`` of every call as (N, T, J) and (N, T, I), concatenated along T."""
    deltas, xs = [], []
    for call in calls:
        xs.append(batched(call.x.detach(), ctx.n, 1, call.dims.x))
        deltas.append(batched(call.delta, ctx.n, 1, call.dims.out))
    return cat_uses(deltas), cat_uses(xs)


class LinearRule(Rule):
    """``nn.Linear``: weight (J, I), bias (J)."""

    transposed = False  # Conv1D keeps W as (I, J)

    def unbatched(self, layer, x):
        return x.dim() <= 1

    def exact(self, layer, calls, ctx, accs):
        if all(c.deltas[0] is None for c in calls):
            return  # no output reached the loss (BERT's pooler under last_hidden_state): every g_k is 0
        delta, x = _factors(calls, ctx)
        if "weight" in accs:
            a, b = (x, delta) if self.transposed else (delta, x)
            ctx.reduce.bmm_(accs["weight"], a, b, ctx.budget)
        if "bias" in accs:
            acc = accs["bias"]
            lib = native_sums(ctx, (acc,), (delta,))
            if lib is not None:  # sum over positions, abs, sum over samples: one pass, no (N, J) temporary
                lib.abs_position_sums_(acc, unit_rows(delta))
            else:
                ctx.reduce.dense_(acc, delta.to(acc.dtype).sum(1))

    def exact_many(self, work, ctx):
        """Every layer of this rule in the batch: where the native sums serve them, in one native call
        (``linear_abs_sums_``: each layer's ``abs_bmm`` and bias sums, no Python between layers); the others
        one by one (:meth:`exact`)."""
        lib = native_lib(ctx) if len(work) > 1 else None
        if lib is None or not hasattr(lib, "linear_abs_sums_"):
            return super().exact_many(work, ctx)
        accs_w, accs_b, deltas, xs = [], [], [], []
        for layer, calls, accs in work:
            if all(c.deltas[0] is None for c in calls):
                continue  # no output reached the loss: every g_k is 0
            delta, x = _factors(calls, ctx)
            w, b = accs.get("weight"), accs.get("bias")
            if not native_fits([a for a in (w, b) if a is not None], (delta, x)):
                self.exact(layer, calls, ctx, accs)
                continue
            accs_w.append(w)
            accs_b.append(b)
            deltas.append(delta)
            xs.append(x)
        if deltas:
            lib.linear_abs_sums_(accs_w, accs_b, deltas, xs, self.transposed, ctx.budget)

    def factors(self, layer, calls, ctx, attr):
        if attr != "weight" or not calls:
            return None
        delta, x = _factors(calls, ctx)
        return (x, delta) if self.transposed else (delta, x)

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        delta, x = _factors(calls, ctx)
        dt = work_dtype(layer.module.weight)
        delta, x = delta[lo:hi].to(dt), x[lo:hi].to(dt)
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
            a, b = (x2, y2) if self.transposed else (y2, x2)
            abs_outer_(accs["weight"], a, b)
        if "bias" in accs:
            accs["bias"].add_(y2.abs().sum(0, dtype=accs["bias"].dtype))


class Conv1DRule(LinearRule):
    """transformers' ``Conv1D`` (GPT-2): ``y = x W + b`` with W (I, J)."""

    transposed = True
