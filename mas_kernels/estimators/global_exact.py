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

What the rules may assume is observed first (``layout.py``, ``uses.py``):
where each call keeps its samples, and every use of every parameter. A
parameter that no rule can serve as observed (used outside the layers whose
rules cover it, a layer whose samples could not be located, a layer called on
a tensor the whole batch shares) gets the **per-sample fallback**: the
gradient of each sample's ``||F(x_k)||^2`` through the same recorded graph
(exact for any use, N times the backward's cost for those parameters), with a
warning naming it and why. Samples that are not independent (the model's
output for a sample depends on the others) have no per-sample gradient: the
rule refuses them by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Callable

import torch
from torch import nn

from ..ops.abs_bmm import DEFAULT_MEMORY_BUDGET
from ..state import FlatBuffers
from .batch import Batch
from .capture import backward, capture, grad
from .layout import UNKNOWN, call_leaves, rows, take, with_leaves
from .plan import Plan
from .reduction import ABS, Reduction
from .rules.base import Context, cat_uses


def squared_norm(out: torch.Tensor) -> torch.Tensor:
    """``sum_k ||F(x_k)||_2^2`` over the batch, in float32 (float64 for a float64 output)."""
    return out.to(torch.promote_types(out.dtype, torch.float32)).pow(2).sum()


class ExactEstimator:
    """Exact per-sample importance of the tracked parameters for one batch, into the staging buffers.

    Args:
        module: the model.
        params: the tracked parameters.
        plan: which layer's rule covers which parameter.
        output_fn: picks the output tensor.
        memory_budget: bytes of per-sample scratch a rule may hold at once.
        max_chunk: at most this many samples per chunk of scratch.
        reduction: per-sample gradients -> numerators (``|.|`` for MAS; see ``reduction.py``).
        fallback: a predicate ``(name) -> bool``: parameters that always get the per-sample fallback
            (``MAS(per_sample_fallback=)``).
    """

    def __init__(self, module: nn.Module, params: dict[str, nn.Parameter], plan: Plan, output_fn: Callable,
                 memory_budget: int | None = None, max_chunk: int | None = None, reduction: Reduction = ABS,
                 fallback: Callable[[str], bool] | None = None):
        self.module = module
        self.params = params
        self.plan = plan
        self.output_fn = output_fn
        self.budget = int(memory_budget or DEFAULT_MEMORY_BUDGET)
        self.max_chunk = max_chunk
        self.reduction = reduction
        self.forced = fallback
        self._warned: set[str] = set()

    def check(self) -> None:
        """Worded errors for layers the rule cannot serve as they are, before any forward pass."""
        for layer in self.plan.layers:
            layer.rule.check(layer)

    # ------------------------------------------------------------ fallback
    def fallback(self, layout) -> dict[str, str]:
        """Parameter name -> why it gets the per-sample fallback under ``layout`` (cached on the layout, for the
        plan, parameters and forced predicate it was derived from: a wrapper makes a new estimator per
        ``estimate()``, and the ids of objects the entry keeps alive are not reused)."""
        key = ("exact fallback", id(self.plan), id(self.params), id(self.forced))
        got = layout.notes.get(key)
        if got is not None and got[0] is self.plan and got[1] is self.params and got[2] is self.forced:
            return got[3]
        why: dict[str, str] = {}
        for name, ops in layout.stray.items():
            if name in self.params:
                more = f" and {len(ops) - 1} more" if len(ops) > 1 else ""
                why[name] = f"it is used outside the layers whose rules cover it ({ops[0]}{more})"
        for layer in self.plan.layers:
            calls = layout.calls.get(id(layer.module), [])
            reason = None
            if isinstance(layer.module, torch.jit.ScriptModule) and layer.rule.inline_forward is None:
                # its forward runs in the TorchScript interpreter: torch.func cannot re-run it per sample (the
                # generic rule), and a built-in rule's type test does not see the layer it was scripted from
                reason = f"layer {layer.name!r} is a TorchScript module (torch.jit.script/trace)"
            for c in ([] if reason else calls):
                if not c.known:
                    reason = f"where the calls of layer {layer.name!r} keep their samples could not be observed"
                elif layer.rule.own_layout or layout.single:
                    continue
                elif c.outs and any(d is None for d in c.outs) and c.expand is None:
                    reason = (f"layer {layer.name!r} is called on tensors the whole batch shares (its output "
                              "gradient sums every sample's)")
                elif not layer.rule.accepts(layer, c):
                    reason = f"the rule of layer {layer.name!r} cannot serve the layout observed for it"
                elif c.rows and any(n in self.plan.shared for n in layer.names()):
                    reason = f"layer {layer.name!r} is called on subsets of the samples and shares a parameter"
                if reason:
                    break
            if reason:
                for name in layer.names():
                    why.setdefault(name, reason)
        if self.forced is not None:
            for name in self.params:
                if name not in why and self.forced(name):
                    why[name] = "per_sample_fallback= asks for it"
        for k in [k for k, v in layout.notes.items() if k[0] == "exact fallback" and v[0] is self.plan]:
            del layout.notes[k]  # what an earlier estimator of this plan derived (another predicate, parameters)
        layout.notes[key] = (self.plan, self.params, self.forced, why)
        return why

    # ----------------------------------------------------------------- run
    def run(self, batch: Batch, staging, names: list[str] | None = None, check=None) -> torch.Tensor:
        """Add the batch's numerators of ``names`` (default: every tracked parameter) into ``staging``; return
        the model's output on the batch (detached).

        ``check``: the self-check's request (``verify.Request``): the numerators of its few samples alone,
        computed from this batch's own recorded calls sliced to them (no pass of their own), into
        ``check.fast``; left undone (``check.done`` False) where a call cannot be sliced (an RNN's inline
        replay, calls on subsets of the samples)."""
        layout = batch.layout
        n = batch.n
        if layout.coupled and not layout.single and layout.unsliced:
            raise ValueError(
                f"MAS(importance='global'): {layout.coupled}. Per-sample importance needs each argument of the "
                "model's call to keep its samples in one dim (a flat input with offsets, as nn.EmbeddingBag's, "
                "does not: pass the bags as one (N, L) tensor, padded with padding_idx=), and the model to run on "
                "a few samples alone (a state it carries from one call to the next, sized for a whole batch, does "
                "not: turn the carrying off for the estimate, each call from a fresh state), or "
                "use importance='global_batch' (one gradient per batch)"
            )
        if layout.coupled and not layout.single:
            raise ValueError(
                f"MAS(importance='global'): {layout.coupled}, so a per-sample gradient is not defined. Estimate "
                "in eval mode (the default), pass sample_dim= if the samples are kept in another dim, or use "
                "importance='global_batch' (one gradient per batch)"
            )
        wanted = set(self.params if names is None else names)
        slow = {k: v for k, v in self.fallback(layout).items() if k in wanted}
        fast = wanted - set(slow)
        if slow and hasattr(staging, "per_sample_backward"):
            staging.per_sample_backward(sorted(slow))  # a sharded state refuses one backward per sample by name
        layers = [layer for layer in self.plan.layers if fast & set(layer.names())]
        modules = list({id(layer.module): layer.module for layer in layers}.values())
        inline = {layer.module: layer for layer in layers if layer.rule.inline_forward is not None}
        ctx = Context(n, self.budget, self.max_chunk, self.reduction)
        # Inside the backward only where the numerators are plain views (a sharded staging reduce-scatters per
        # scope) and no self-check reads the recorded gradients after it.
        eager = self._eager(layers, layout, fast) if check is None and isinstance(staging, FlatBuffers) else {}
        done: set = set()

        def then(module, call):
            """The rule of a layer called once, run as soon as its output gradient is complete (its output
            gradient still in cache, and dropped after: the gradients do not all live to the end of the
            backward)."""
            layer = eager.get(module)
            if layer is None:
                return None

            def run():
                with torch.no_grad():
                    layer.rule.exact(layer, [call], ctx, {a: staging[name] for a, name in layer.attrs.items()
                                                          if name in fast})
                call.deltas[0] = None
                done.add(module)
            return run

        with torch.enable_grad():
            rec = None
            try:
                with capture(modules, layout=layout, n=n, inline=inline, then=then if eager else None) as rec:
                    out = self.output_fn(batch.forward())
                rec.check(n)
                loss = squared_norm(out)
                backward(loss, rec, retain_graph=bool(slow))
            finally:
                if rec is not None:
                    rec.release()  # the eager calls' hooks: run, or never to run
        with torch.no_grad():
            del loss
            # The layers of one rule together (Rule.exact_many: small layers in one native call), where the
            # numerators are plain views; a sharded staging reduce-scatters each layer's after its rule.
            together: dict | None = {} if type(staging) is FlatBuffers else None
            for layer in layers:
                if layer.module in done:
                    continue
                calls = rec.calls[layer.module]
                names_ = [name for name in layer.attrs.values() if name in fast and name not in self.plan.shared]
                with _scope(staging, [layer], names_):  # a sharded state reduce-scatters the layer's numerators
                    accs = {a: staging[name] for a, name in layer.attrs.items() if name in names_ and calls}
                    if not accs:
                        continue
                    if any(c.dims is not None and c.dims.rows for c in calls):
                        for call in calls:  # calls on disjoint subsets of the samples: each a batch of its own
                            m = int(call.x.shape[0]) if call.x.dim() else 1
                            layer.rule.exact(layer, [call], dataclasses.replace(ctx, n=m), accs)
                    elif together is not None:
                        together.setdefault(id(layer.rule), (layer.rule, []))[1].append((layer, calls, accs))
                    else:
                        layer.rule.exact(layer, calls, ctx, accs)
            for rule, work in (together or {}).values():
                rule.exact_many(work, ctx)
            for name in self.plan.shared:
                if name in fast:
                    with _scope(staging, [layer for layer, _ in self.plan.uses[name]], [name]):
                        self._shared(name, rec.calls, ctx, staging[name])
            if check is not None and check.sliceable and _sliceable(rec, layers):
                idx = torch.as_tensor(check.idx, dtype=torch.long)
                sliced = {m: [_slice(c, idx, n) for c in cs] for m, cs in rec.calls.items()}
                sub = dataclasses.replace(ctx, n=len(check.idx))
                for layer in layers:
                    accs = {a: check.fast[name] for a, name in layer.attrs.items()
                            if name in fast and name not in self.plan.shared and sliced[layer.module]}
                    if accs:
                        layer.rule.exact(layer, sliced[layer.module], sub, accs)
                for name in self.plan.shared:
                    if name in fast:
                        self._shared(name, sliced, sub, check.fast[name])
                check.done, check.output = True, take(out.detach(), layout.output, idx, n) \
                    if layout.output is not None and layout.output is not UNKNOWN else None
        if slow:
            with torch.enable_grad():
                self._per_sample(slow, out, layout, n, staging)
                if check is not None and check.done:
                    self._per_sample(slow, out, layout, n, check.fast, only=check.idx)
        return out.detach()

    def _eager(self, layers, layout, fast: set) -> dict:
        """module -> layer, for the layers whose rule may run inside the backward (``Rule.eager``): called once
        in the observed layout on all the samples, no parameter shared with another layer."""
        eager = {}
        for layer in layers:
            seen = layout.calls.get(id(layer.module), [])
            names = list(layer.attrs.values())
            if (layer.rule.eager and len(seen) == 1 and not seen[0].rows
                    and not any(name in self.plan.shared for name in names) and any(name in fast for name in names)):
                eager[layer.module] = layer
        return eager

    def _shared(self, name: str, calls: dict, ctx: Context, acc: torch.Tensor) -> None:
        """One parameter, several layers: their per-sample contributions summed, then the reduction."""
        uses = [(layer, attr) for layer, attr in self.plan.uses[name] if calls.get(layer.module)]
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
            ctx.reduce.bmm_(acc, cat_uses([f[0] for f in factors]), cat_uses([f[1] for f in factors]), ctx.budget)
            return
        step = max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // (acc.element_size() * acc.numel() * len(uses) or 1)))
        for lo in range(0, ctx.n, step):
            hi = min(ctx.n, lo + step)
            total = None
            for layer, attr in uses:
                g = layer.rule.per_sample(layer, calls[layer.module], ctx, [attr], lo, hi)[attr]
                total = g if total is None else total + g
            ctx.reduce.dense_(acc, total)

    @staticmethod
    def _sparse_and_dense(sparse, factors, calls, ctx: Context, acc: torch.Tensor) -> None:
        """Uses with sparse per-sample rows (embeddings) beside uses in factored form (a tied LM head).

        With ``L_k = sum a_k^T b_k`` the dense part and ``E_k`` the sample's
        embedding rows: ``sum_k r(L_k + E_k) = sum_k r(L_k) + sum_k sum_{r in rows(k)}
        (r(L_k[r] + E_k[r]) - r(L_k[r]))``: one fused product, then a correction on the
        rows each sample's tokens touch, never a dense V x D matrix per sample.
        """
        keys, rows_ = [], []
        for layer, attr in sparse:
            got = layer.rule.sparse_rows(layer, calls[layer.module], ctx, attr)
            keys.append(got[0] * acc.shape[0] + got[1])
            rows_.append(got[2])
        uniq, inv = torch.unique(torch.cat(keys), return_inverse=True)
        e = torch.zeros(uniq.numel(), acc.shape[1], device=acc.device, dtype=acc.dtype).index_add_(
            0, inv, torch.cat(rows_).to(acc.dtype))
        sample, row = uniq // acc.shape[0], uniq % acc.shape[0]
        red = ctx.reduce
        if not factors:
            acc.index_add_(0, row, red.apply(e))
            return
        a = cat_uses([f[0].to(acc.dtype) for f in factors])
        b = cat_uses([f[1].to(acc.dtype) for f in factors])
        red.bmm_(acc, a, b, ctx.budget)
        # L_k at each sample's rows, all samples in one batched product: the rows of sample k (uniq is sorted,
        # so grouped by sample) padded to the most any sample has, gathered from a_k, times b_k.
        counts = torch.bincount(sample, minlength=a.shape[0])
        pos = torch.arange(sample.numel(), device=acc.device) - (counts.cumsum(0) - counts)[sample]
        width = int(counts.max()) if sample.numel() else 0
        if width == 0:
            return
        idx = torch.zeros(a.shape[0], width, dtype=torch.long, device=acc.device)
        idx[sample, pos] = row
        picked = torch.gather(a, 2, idx.unsqueeze(1).expand(-1, a.shape[1], -1))  # (N, T, width)
        dense = torch.bmm(picked.transpose(1, 2), b)[sample, pos]  # (rows, D)
        acc.index_add_(0, row, red.apply(dense + e) - red.apply(dense))

    # ----------------------------------------------------------- fallback
    def _per_sample(self, slow: dict[str, str], out: torch.Tensor, layout, n: int, staging,
                    only: list[int] | None = None) -> None:
        """The per-sample fallback: each sample's gradient of ``||F(x_k)||^2`` through the recorded graph.

        Sample k's gradient is the gradient of its rows of the output (the samples
        are independent: the probe checked), so this is exact for any use of the
        parameters, ``forward=``'s own steps included. The samples' backward passes
        run batched (``is_grads_batched``, chunked within the memory budget) where
        torch can vectorise them, one at a time otherwise.
        """
        names = sorted(slow)
        new = [k for k in names if k not in self._warned]
        if new and only is None:
            self._warned.update(new)
            reasons = sorted({slow[k] for k in new})
            warnings.warn(
                f"MAS(importance='global'): parameters {new} get their exact importance from one backward pass "
                f"per sample (slow) because {'; '.join(reasons)}. Register a rule for the module that uses them "
                "(mas_kernels.register_rule) to make it fast.", RuntimeWarning, stacklevel=5)
        dim = layout.output if not layout.single else None
        if not layout.single and (dim is None or dim is UNKNOWN):
            raise ValueError(
                f"MAS(importance='global'): parameters {names} need the per-sample fallback, but the model's "
                f"output of shape {tuple(out.shape)} keeps no dim of the batch's samples, so their per-sample "
                "gradients cannot be told apart; use importance='global_batch'")
        params = [self.params[k] for k in names]
        scale = out.detach() * 2  # d ||out_k||^2 / d out, on sample k's rows
        if layout.single:
            grads = grad(out, params, scale, allow_unused=True, retain_graph=True)
            self._add(names, [None if g is None else g.unsqueeze(0) for g in grads], staging)
            return
        per = sum(p.numel() * 8 for p in params) + scale.numel() * scale.element_size()
        step = max(1, min(n, self.max_chunk or n, self.budget // max(1, per)))
        order = torch.arange(n, device=out.device) if only is None else torch.as_tensor(only, device=out.device)
        out_rows = out.shape[dim.dim] // n if hasattr(dim, "dim") else None  # rows per sample, flattened output
        batched_ok = True
        for lo in range(0, len(order), step):
            idx = order[lo:lo + step]
            if batched_ok:
                g_out = torch.zeros((len(idx), *out.shape), dtype=scale.dtype, device=out.device)
                for j, k in enumerate(idx.tolist()):
                    r = rows(dim, torch.tensor([k], device=out.device), out_rows)
                    d = dim.dim if hasattr(dim, "dim") else dim
                    g_out[j].index_copy_(d, r, scale.index_select(d, r))
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        grads = grad(out, params, g_out, allow_unused=True, retain_graph=True, is_grads_batched=True)
                    self._add(names, grads, staging)
                    continue
                except (RuntimeError, NotImplementedError):
                    batched_ok = False  # torch cannot vectorise this graph's backward: one sample at a time
            for k in idx.tolist():
                r = rows(dim, torch.tensor([k], device=out.device), out_rows)
                d = dim.dim if hasattr(dim, "dim") else dim
                g_out = torch.zeros_like(scale).index_copy_(d, r, scale.index_select(d, r))
                grads = grad(out, params, g_out, allow_unused=True, retain_graph=True)
                self._add(names, [None if g is None else g.unsqueeze(0) for g in grads], staging)

    def _add(self, names, grads, staging) -> None:
        with torch.no_grad():
            for k, g in zip(names, grads):
                if g is not None:
                    self.reduction.dense_(staging[k], g.detach())


def _scope(staging, layers, names):
    """``staging.scope(layers, names)`` where the staging has one (a sharded state: the layer's numerators
    reduce-scattered to their owners after), else nothing."""
    scope = getattr(staging, "scope", None)
    return scope(layers, names) if scope is not None else contextlib.nullcontext()


def _sliceable(rec, layers) -> bool:
    """Whether every recorded call of ``layers`` can be cut to a few of its samples by its observed dims."""
    for layer in layers:
        for c in rec.calls[layer.module]:
            if c.dims is None or not c.dims.known or c.dims.rows or c.replay is not None:
                return False
    return True


def _slice(call, idx: torch.Tensor, n: int):
    """``call`` restricted to the samples ``idx``: every tensor taken along its observed sample dim (a shared
    one kept whole), as the layer would have seen those samples alone."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    from .capture import Call

    d = call.dims
    args, kwargs = with_leaves(call.args, call.kwargs, [take(t, dd, idx, n) for t, dd in
                                                        zip(call_leaves(call.args, call.kwargs), d.ins)])
    outs = [take(t, dd, idx, n) for t, dd in zip(call.outputs, d.outs)]
    if isinstance(call.output, torch.Tensor):
        output = outs[0]
    else:
        out_leaves, out_spec = tree_flatten(call.output)
        it = iter(outs)
        output = tree_unflatten([next(it) if isinstance(t, torch.Tensor) else t for t in out_leaves], out_spec)
    deltas = [None if g is None else take(g, dd, idx, n) for g, dd in zip(call.deltas, d.outs)]
    return Call(args, kwargs, output, deltas, call.edges, dims=d, outs=outs)
