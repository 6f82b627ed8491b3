r"""``nn.Embedding``: per sample, the output gradients of each token id summed, then the absolute value.

Sample k's gradient has one row per distinct token id it contains:
``g_W[v] = sum_{t: id_kt = v} delta_kt`` (divided by the id's count in the
call's input of the sample when ``scale_grad_by_freq``; nothing for
``padding_idx``). Exact without a dense V x D matrix per sample: the
(sample, id) pairs are made unique, their rows summed with ``index_add``,
and ``|rows|`` scattered into Omega. Local: ``|y|`` of each position added to
the row of its token (the padding row gets nothing).
"""

from __future__ import annotations

import torch

from ..layout import batched
from .base import Rule, native_sums, unit_rows, work_dtype


def _keyed(layer, calls, ctx, lo: int = 0, hi: int | None = None):
    """(keys, rows): for every position of samples lo:hi over every call, ``s * V + id`` and its gradient row."""
    module = layer.module
    V = module.num_embeddings
    hi = ctx.n if hi is None else hi
    keys, rows = [], []
    for call in calls:
        if call.deltas[0] is None:
            continue
        ids = batched(call.x, ctx.n, 0, call.dims.x)[lo:hi]  # (S, T)
        delta = batched(call.delta, ctx.n, 1, call.dims.out)[lo:hi].to(work_dtype(module.weight))  # (S, T, D)
        s = torch.arange(hi - lo, device=ids.device).unsqueeze(1).expand_as(ids)
        key = s * V + ids
        if module.scale_grad_by_freq:
            # as the layer's backward: each position's row divided by its id's count in the input
            # (per sample here: the sample's own input)
            _, inv, counts = torch.unique(key.reshape(-1), return_inverse=True, return_counts=True)
            delta = delta / counts[inv].view(ids.shape).unsqueeze(-1).to(delta.dtype)
        keep = (ids != module.padding_idx) if module.padding_idx is not None else None
        key, delta = key.reshape(-1), delta.reshape(-1, delta.shape[-1])
        if keep is not None:
            keep = keep.reshape(-1)
            key, delta = key[keep], delta[keep]
        keys.append(key)
        rows.append(delta)
    if not keys:
        return None
    return torch.cat(keys), torch.cat(rows)


class EmbeddingRule(Rule):
    """``nn.Embedding``: weight (V, D)."""

    attrs = ("weight",)

    def feature_dims(self, layer, x):
        return 0

    def exact(self, layer, calls, ctx, accs):
        if "weight" not in accs:
            return
        module, acc = layer.module, accs["weight"]
        live = [c for c in calls if c.deltas[0] is not None]
        if len(live) == 1 and not module.scale_grad_by_freq:  # the usual: one call, rows summed per (sample, id)
            call = live[0]
            delta = batched(call.delta, ctx.n, 1, call.dims.out)
            lib = native_sums(ctx, (acc,), (delta,))
            if lib is not None:
                ids = batched(call.x, ctx.n, 0, call.dims.x)
                pad = -1 if module.padding_idx is None else module.padding_idx
                lib.embedding_abs_rows_(acc, ids, unit_rows(delta), pad)
                return
        keyed = _keyed(layer, calls, ctx)
        if keyed is None:
            return
        keys, rows = keyed
        uniq, inv = torch.unique(keys, return_inverse=True)
        sums = torch.zeros(uniq.numel(), rows.shape[1], device=rows.device, dtype=acc.dtype).index_add_(
            0, inv, rows.to(acc.dtype))
        acc.index_add_(0, uniq % layer.module.num_embeddings, ctx.reduce.apply(sums))

    def sparse_rows(self, layer, calls, ctx, attr):
        if attr != "weight":
            return None
        keyed = _keyed(layer, calls, ctx) if calls else None
        V = layer.module.num_embeddings
        if keyed is None:
            empty = torch.zeros(0, dtype=torch.long, device=layer.module.weight.device)
            return empty, empty, torch.zeros(0, layer.module.embedding_dim, device=layer.module.weight.device,
                                             dtype=work_dtype(layer.module.weight))
        keys, rows = keyed
        return keys // V, keys % V, rows

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        V, D = layer.module.weight.shape
        out = torch.zeros((hi - lo) * V, D, device=layer.module.weight.device, dtype=work_dtype(layer.module.weight))
        keyed = _keyed(layer, calls, ctx, lo, hi)
        if keyed is not None:
            out.index_add_(0, keyed[0], keyed[1])
        return {"weight": out.view(hi - lo, V, D)}

    def factors(self, layer, calls, ctx, attr):
        """``g_k = onehot_k^T delta_k``: a (N, T, V) one-hot (scaled, padding rows zero) and (N, T, D)."""
        module = layer.module
        V = module.num_embeddings
        a, b = [], []
        for call in calls:
            if call.deltas[0] is None:
                continue
            dt = work_dtype(module.weight)
            ids = batched(call.x, ctx.n, 0, call.dims.x)
            delta = batched(call.delta, ctx.n, 1, call.dims.out).to(dt)
            onehot = torch.nn.functional.one_hot(ids, V).to(dt)
            if module.scale_grad_by_freq:
                counts = onehot.sum(1, keepdim=True)  # per sample: each id's count
                onehot = onehot / counts.clamp_min(1)
            if module.padding_idx is not None:
                onehot[..., module.padding_idx] = 0
            a.append(onehot)
            b.append(delta)
        if not a:
            return None
        return torch.cat(a, 1), torch.cat(b, 1)

    def local(self, layer, call, accs):
        if "weight" not in accs:
            return
        module = layer.module
        ids = call.x.reshape(-1)
        y = call.outputs[0].detach().reshape(ids.numel(), -1).abs().to(accs["weight"].dtype)
        if module.padding_idx is not None:
            keep = ids != module.padding_idx
            ids, y = ids[keep], y[keep]
        accs["weight"].index_add_(0, ids, y)
