r"""Every other layer: a module-local per-sample vector-Jacobian product.

For a module that owns tracked parameters without a rule of its own (a
custom layer, a norm of another library, ``nn.MultiheadAttention``, the RNNs),
its recorded call is replayed per sample with ``torch.func``: ``vmap`` over
the samples of ``vjp(functional_call(module, params, x_k), delta_k)``, which
is the exact per-sample gradient of those parameters (``delta_k`` is the
loss gradient w.r.t. the module's output, so nothing outside the module is
re-run). Each sample keeps a batch dim of 1, so the module sees the shapes it
always sees. Chunks of samples keep the per-sample gradients within the
memory budget.

Which dim of each argument and output holds the samples: as the probe
observed it (``layout.py``): an argument the batch shares (a mask) is passed
whole to every sample; a flattened ``(N*T, ...)`` argument gives each sample
its T rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..layout import Flat
from .base import Rule, work_dtype


def get_path(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


class GenericRule(Rule):
    """The module-local per-sample vjp, for the parameters ``attrs`` of one module (dotted paths allowed)."""

    local_supported = False

    def __init__(self, attrs: tuple[str, ...] | None = None):
        self._attrs = attrs

    def covers(self, module):
        if self._attrs is not None:
            return [a for a in self._attrs if isinstance(_maybe(module, a), nn.Parameter)]
        return [n for n, _ in module.named_parameters(recurse=False)]

    # ------------------------------------------------------ sample dims
    def feature_dims(self, layer, x):
        return max(x.dim() - 1, 0)

    def arg_dims(self, layer, call, n) -> list:
        """For each leaf of ``(args, kwargs)``: the dim holding the samples, or None (shared), as observed."""
        return list(call.dims.ins)

    def out_dims(self, layer, call, n) -> list:
        """For each tensor output: the dim holding the samples (None: the output has none), as observed."""
        return list(call.dims.outs)

    def chunk(self, module, ctx, per_sample_bytes=None):
        size = per_sample_bytes or 4 * sum(_maybe(module, a).numel() for a in self.covers(module)) or 1
        return max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // (2 * size)))  # vjp's own scratch is about one more copy

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        from torch.func import functional_call, vjp, vmap

        module = layer.module
        params = {a: _maybe(module, a).detach() for a in attrs}
        dt = work_dtype(*params.values())
        out = {a: torch.zeros((hi - lo, *p.shape), device=p.device, dtype=dt) for a, p in params.items()}
        for call in calls:
            outs = call.outputs
            if not any(d is not None for d in call.deltas):
                continue
            leaves, spec = tree_flatten((call.args, call.kwargs))
            a_dims = self.arg_dims(layer, call, ctx.n)
            o_dims = self.out_dims(layer, call, ctx.n)
            keep = [i for i, t in enumerate(outs) if call.deltas[i] is not None]
            for i in keep:
                if o_dims[i] is None:
                    raise ValueError(
                        f"MAS: output {i} of layer {layer.name!r} ({type(module).__name__}, shape "
                        f"{tuple(outs[i].shape)}) has no dim of the batch's {ctx.n} samples, so its per-sample "
                        "gradients cannot be told apart; use importance='global_batch' for this model"
                    )
            batched_idx = [i for i, d in enumerate(a_dims) if d is not None]
            shared = [t.detach() if isinstance(t, torch.Tensor) else t for t in leaves]
            unbatched = not batched_idx and all(o_dims[i] is None for i in keep)
            if unbatched and ctx.n != 1:
                raise ValueError(f"MAS: layer {layer.name!r} got unbatched inputs in a batch of {ctx.n} samples")

            def one(ps, xs, ds):
                vals = list(shared)
                for j, i in enumerate(batched_idx):
                    vals[i] = _one_sample(xs[j], a_dims[i])  # the sample, with a batch dim of 1
                args, kwargs = tree_unflatten(vals, spec)

                def fn(ps_):
                    res = functional_call(module, ps_, args, kwargs, strict=False)
                    flat = [t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)]
                    return tuple(flat[i] for i in keep)

                _, pull = vjp(fn, ps)
                if unbatched:
                    return pull(tuple(ds))[0]
                return pull(tuple(_one_sample(d, o_dims[i]) for d, i in zip(ds, keep)))[0]

            if unbatched:  # one sample without a batch dim: its gradient is the call's
                grads = {a: g.unsqueeze(0) for a, g in one(params, (), tuple(call.deltas[i] for i in keep)).items()}
            else:
                xs = tuple(_samples_first(leaves[i].detach(), a_dims[i], ctx.n)[lo:hi] for i in batched_idx)
                ds = tuple(_samples_first(call.deltas[i], o_dims[i], ctx.n)[lo:hi] for i in keep)
                try:
                    grads = vmap(one, in_dims=(None, 0, 0), randomness="different")(params, xs, ds)
                except RuntimeError:
                    # A forward vmap cannot batch (an RNN cell that makes its own zero state from the call's
                    # batch size, hx=None): the same, one sample at a time (a real error raises again here).
                    rows = [one(params, tuple(x[k] for x in xs), tuple(d[k] for d in ds)) for k in range(len(ds[0]))]
                    grads = {a: torch.stack([r[a] for r in rows]) for a in attrs}
            for a in attrs:
                out[a] += grads[a].to(dt)
        return out


def _maybe(module: nn.Module, path: str):
    try:
        return get_path(module, path)
    except AttributeError:
        return None


def _samples_first(t: torch.Tensor, d, n: int) -> torch.Tensor:
    """``t`` with its samples in dim 0: ``(N, ...)`` (a flattened dim of N*T rows becomes (N, T, ...))."""
    if isinstance(d, Flat):
        return t.unflatten(d.dim, (n, -1)).movedim(d.dim, 0)
    return t.movedim(d, 0)


def _one_sample(t: torch.Tensor, d) -> torch.Tensor:
    """One sample's slice (samples-first dropped by vmap) back in its layout, as a batch of one."""
    if isinstance(d, Flat):  # the sample's rows are already where a batch of one keeps them
        return t
    return t.unsqueeze(d)
