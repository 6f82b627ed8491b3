r"""The exact global rule (the paper, Eq. 2): ``Omega = (1/N) sum_k |d ||F(x_k)||_2^2 / d theta|``.

One forward and one backward per batch. The forward records each layer's
calls (``capture``); the backward of ``sum_k ||F(x_k)||^2`` gives the loss
gradient w.r.t. each call's output; each layer's rule turns (input, output
gradient) into ``sum_k |g_k|``, the sum over samples of the absolute
per-sample gradient (``rules``): an abs-GEMM per sample for Linear, Conv1D and
conv layers, unique-id row sums for embeddings, per-sample sums for norms, a
module-local per-sample vjp for everything else. Parameters with several uses
(tied weights) get the per-sample sum of all uses before the absolute value.
The whole model's per-sample gradients are never formed.

A parameter whose layer was not called although the loss depends on it (the
model reads it outside that layer's forward) gets its exact per-sample
gradient from one backward pass per sample through the same recorded graph,
with a warning naming it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from .batch import Batch
from .capture import backward, capture
from .global_batch import squared_norm
from .plan import Plan
from .rules.base import Context, cat_uses
from ..ops import abs_bmm_accumulate_

DEFAULT_BUDGET = 256 << 20  # bytes of per-sample scratch at once


def _graph_params(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors the loss's autograd graph reaches."""
    found, seen, stack = set(), set(), [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None:
            found.add(id(var))
        stack.extend(f for f, _ in fn.next_functions)
    return found


def _subsets(layer, calls: list, ctx: Context) -> list | None:
    """``[(call, samples)]`` when the calls of ``layer`` each saw a different subset of the batch's samples
    (a multi-task model's head per task: ``head(h[task == t])``), None when every call saw them all.

    Subsets are calls whose input holds fewer than N samples and together exactly N; each sample then
    reaches the layer through one call, so each call is a batch of its own. Anything else is refused.
    """
    sizes = []
    for call in calls:
        x = call.x if call.args else None
        if not isinstance(x, torch.Tensor):
            return None
        d = layer.reads(x)
        if d is not None and ctx.layout is not None and layer.hint is None and d == 0 and x.dim() > ctx.layout \
                and x.shape[ctx.layout] == ctx.n:
            d = ctx.layout
        sizes.append(1 if d is None else int(x.shape[d]))
    if all(m == ctx.n for m in sizes):
        return None
    lead = [call.x.shape[:call.x.dim() - layer.rule.feature_dims(layer, call.x)] for call in calls]
    if all(m < ctx.n for m in sizes) and sum(sizes) <= ctx.n and not any(ctx.n in shape for shape in lead):
        return list(zip(calls, sizes))
    raise ValueError(
        f"MAS: layer {layer.name!r} was called {len(calls)} time(s) on inputs of "
        f"{[tuple(c.x.shape) for c in calls]} in a batch of {ctx.n} samples: neither the whole batch each "
        "time nor disjoint subsets of it, so its per-sample gradients cannot be told apart; use "
        "importance='global_batch' for this model"
    )


class ExactRule:
    """Exact per-sample importance of the tracked parameters for one batch, into the staging buffers.

    Args:
        module: the model.
        params: the tracked parameters.
        plan: which layer's rule covers which parameter.
        output_fn: picks the output tensor.
        memory_budget: bytes of per-sample scratch a rule may hold at once.
        max_chunk: at most this many samples per chunk of scratch.
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], plan: Plan, output_fn: Callable,
                 memory_budget: int | None = None, max_chunk: int | None = None):
        self.module = module
        self.params = params
        self.plan = plan
        self.output_fn = output_fn
        self.budget = int(memory_budget or DEFAULT_BUDGET)
        self.max_chunk = max_chunk
        self._warned: set[str] = set()

    def check(self) -> None:
        """Worded errors for layers the rule cannot serve as they are, before any forward pass."""
        for layer in self.plan.layers:
            layer.rule.check(layer)

    def run(self, batch: Batch, staging, names: list[str] | None = None) -> None:
        """Add the batch's numerators of ``names`` (default: every tracked parameter) into ``staging``."""
        wanted = set(self.params if names is None else names)
        self.check()
        layers = [layer for layer in self.plan.layers if wanted & set(layer.names())]
        modules = list({id(layer.module): layer.module for layer in layers}.values())
        with torch.enable_grad():
            with capture(modules, plan=self.plan, n=lambda: batch.n) as rec:
                out = self.output_fn(batch.forward(self.plan))
            loss = squared_norm(out)
            # A layer not called although the loss depends on its parameters: the model uses them
            # outside that layer's forward, where no per-layer rule sees them.
            uncalled = [layer for layer in layers if not rec.calls[layer.module]]
            stray: list[str] = []
            if uncalled:
                reached = _graph_params(loss)
                stray = [name for layer in uncalled for name in layer.names()
                         if name in wanted and id(self.params[name]) in reached]
                if stray:  # a sharded state refuses one backward per sample (each a collective) by name
                    staging.per_sample_backward(stray)
            backward(loss, rec, retain_graph=bool(stray))
        n = batch.n
        ctx = Context(n, self.budget, self.max_chunk, batch.layout)
        with torch.no_grad():
            del loss
            for layer in layers:
                calls = rec.calls[layer.module]
                names = [name for name in layer.attrs.values() if name in wanted and name not in self.plan.shared]
                with staging.scope([layer], names):  # a sharded state reduce-scatters the layer's numerators after
                    accs = {a: staging[name] for a, name in layer.attrs.items() if name in names and calls}
                    if not accs:
                        continue
                    parts = _subsets(layer, calls, ctx)
                    if parts is None:
                        layer.rule.exact(layer, calls, ctx, accs)
                    else:  # calls on disjoint subsets of the samples: each a batch of its own
                        for call, m in parts:
                            layer.rule.exact(layer, [call], dataclasses.replace(ctx, n=m), accs)
            for name in self.plan.shared:
                if name in wanted and name not in stray:
                    with staging.scope([layer for layer, _ in self.plan.uses[name]], [name]):
                        self._shared(name, rec.calls, ctx, staging[name])
        if stray:  # after the rules: its backward passes fire the recorded calls' hooks again
            with torch.enable_grad():
                self._stray(stray, out, batch, staging)

    def _shared(self, name: str, calls: dict, ctx: Context, acc: torch.Tensor) -> None:
        """One parameter, several layers: their per-sample contributions summed, then the absolute value."""
        uses = [(layer, attr) for layer, attr in self.plan.uses[name] if calls[layer.module]]
        if not uses:
            return
        if len(uses) == 1:
            layer, attr = uses[0]
            layer.rule.exact(layer, calls[layer.module], ctx, {attr: acc})
            return
        sparse = [(layer, attr) for layer, attr in uses if layer.rule.sparse_rows(layer, [], ctx, attr) is not None]
        dense = [(layer, attr) for layer, attr in uses if (layer, attr) not in sparse]
        factors = [layer.rule.factors(layer, calls[layer.module], ctx, attr) for layer, attr in dense]
        if sparse and all(f is not None for f in factors):
            self._sparse_and_dense(sparse, factors, calls, ctx, acc)
            return
        factors = [layer.rule.factors(layer, calls[layer.module], ctx, attr) for layer, attr in uses]
        if all(f is not None for f in factors):
            a = cat_uses([f[0].float() for f in factors])
            b = cat_uses([f[1].float() for f in factors])
            abs_bmm_accumulate_(acc, a, b, memory_budget=ctx.budget)
            return
        step = max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // (4 * acc.numel() * len(uses) or 1)))
        for lo in range(0, ctx.n, step):
            hi = min(ctx.n, lo + step)
            total = None
            for layer, attr in uses:
                g = layer.rule.per_sample(layer, calls[layer.module], ctx, [attr], lo, hi)[attr]
                total = g if total is None else total + g
            acc.add_(total.abs().sum(0))

    @staticmethod
    def _sparse_and_dense(sparse, factors, calls, ctx: Context, acc: torch.Tensor) -> None:
        """Uses with sparse per-sample rows (embeddings) beside uses in factored form (a tied LM head).

        With ``L_k = sum a_k^T b_k`` the dense part and ``E_k`` the sample's
        embedding rows: ``sum_k |L_k + E_k| = sum_k |L_k| + sum_k sum_{r in rows(k)}
        (|L_k[r] + E_k[r]| - |L_k[r]|)``: one abs_bmm, then a correction on the
        rows each sample's tokens touch, never a dense V x D matrix per sample.
        """
        keys, rows = [], []
        for layer, attr in sparse:
            got = layer.rule.sparse_rows(layer, calls[layer.module], ctx, attr)
            keys.append(got[0] * acc.shape[0] + got[1])
            rows.append(got[2])
        uniq, inv = torch.unique(torch.cat(keys), return_inverse=True)
        e = torch.zeros(uniq.numel(), acc.shape[1], device=acc.device).index_add_(0, inv, torch.cat(rows).float())
        sample, row = uniq // acc.shape[0], uniq % acc.shape[0]
        if not factors:
            acc.index_add_(0, row, e.abs_())
            return
        a = cat_uses([f[0].float() for f in factors])
        b = cat_uses([f[1].float() for f in factors])
        abs_bmm_accumulate_(acc, a, b, memory_budget=ctx.budget)
        for k in torch.unique(sample).tolist():
            sel = (sample == k).nonzero()[:, 0]
            r = row[sel]
            dense = a[k][:, r].T @ b[k]  # (rows, D): L_k at the sample's rows
            acc.index_add_(0, r, (dense + e[sel]).abs_() - dense.abs_())

    def _stray(self, names: list[str], out: torch.Tensor, batch: Batch, staging) -> None:
        """Parameters used outside their layers' forward: one backward per sample through the recorded graph.

        Sample k's gradient of ``||F(x_k)||^2`` is the gradient of its slice of the
        output (the samples are independent in eval mode), so this is exact for any
        use, ``forward=``'s own steps included; it costs N backward passes.
        """
        new = [nm for nm in names if nm not in self._warned]
        if new:
            self._warned.update(new)
            warnings.warn(
                f"MAS: parameters {new} are used by the model outside the forward of the layers that own "
                "them (those layers were not called), so no per-layer rule sees the use; their exact "
                "importance comes from one backward pass per sample (slow). Register a rule for the module "
                "that uses them (mas_kernels.register_rule) to make it fast.",
                RuntimeWarning, stacklevel=5,
            )
        params = [self.params[nm] for nm in names]
        dim = batch.layout if batch.layout is not None and out.dim() > batch.layout else 0
        if out.dim() == 0 or out.shape[dim] != batch.n:
            raise ValueError(f"MAS: parameters {names} are used outside their layers' forward, and the output "
                             f"{tuple(out.shape)} has no dim of the batch's {batch.n} samples to tell their "
                             "per-sample gradients apart; use importance='global_batch' for this model")
        for k in range(batch.n):
            grads = torch.autograd.grad(squared_norm(out.narrow(dim, k, 1)), params, allow_unused=True,
                                        retain_graph=True)
            with torch.no_grad():
                for nm, g in zip(names, grads):
                    if g is not None:
                        staging[nm].add_(g.abs().float())
