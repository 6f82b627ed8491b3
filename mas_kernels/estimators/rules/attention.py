r"""``nn.MultiheadAttention``: its projections (in_proj/q/k/v, out_proj, bias_k/v), all through its own call.

Exact: the attention replayed around its own projections (``F.multi_head_attention_forward``
with identity projection weights), so the masks and the attention are PyTorch's own; then one
fused per-sample product per projection weight. ``bias_k``/``bias_v`` (one key/value row for the
whole batch): the module-local per-sample vjp. Local: each projection as a Linear.
Where the samples are comes from the module's API (``batch_first``).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .base import abs_outer_, cat_uses
from .generic import GenericRule


class MultiheadAttentionRule(GenericRule):
    """``nn.MultiheadAttention``: its projections (in_proj/q/k/v, out_proj, bias_k/v), all through its own call.

    ``out_proj`` is an ``nn.Linear`` that MHA never calls (it reads the weight
    directly), so this rule, not the Linear's, covers it. Exact: see
    :meth:`exact` (the module-local per-sample vjp with ``add_bias_kv``).
    Local: see :meth:`local`.
    """

    local_supported = True

    def __init__(self):
        super().__init__(("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                          "bias_k", "bias_v", "out_proj.weight", "out_proj.bias"))

    own_layout = True

    def unbatched(self, layer, x):
        return x.dim() == 2

    def api_layout(self, layer, x):
        return "unbatched" if x.dim() == 2 else (0 if layer.module.batch_first else 1)

    def _query_dim(self, layer, call) -> int | None:
        q = call.args[0] if call.args else call.kwargs["query"]
        return None if q.dim() == 2 else (0 if layer.module.batch_first else 1)

    def arg_dims(self, layer, call, n):
        qd = self._query_dim(layer, call)
        names = ["query", "key", "value"]
        dims = []
        args_leaves = tree_flatten(call.args)[0]
        for i, t in enumerate(args_leaves):
            dims.append(qd if i < 3 and isinstance(t, torch.Tensor) else None)
        for name, v in call.kwargs.items():
            for t in tree_flatten(v)[0]:
                if not isinstance(t, torch.Tensor) or qd is None:
                    dims.append(None)
                elif name in names:
                    dims.append(qd)
                elif name == "key_padding_mask":
                    dims.append(0)
                elif name == "attn_mask" and t.dim() == 3:
                    raise ValueError(
                        f"MAS: layer {layer.name!r} got a per-sample 3-D attn_mask; the per-sample rule of "
                        "nn.MultiheadAttention takes 2-D attn_mask and key_padding_mask only"
                    )
                else:
                    dims.append(None)
        if len(args_leaves) > 3 and qd is not None:
            raise ValueError(f"MAS: layer {layer.name!r}: pass nn.MultiheadAttention's masks as keywords "
                             "(key_padding_mask=, attn_mask=) so their sample dims are known")
        return dims

    def out_dims(self, layer, call, n):
        qd = self._query_dim(layer, call)
        dims = []
        for i, t in enumerate(call.outputs):
            dims.append((qd if i == 0 else 0) if qd is not None else None)
        return dims

    def exact(self, layer, calls, ctx, accs):
        """The attention replayed around its projections, then one abs_bmm per projection weight.

        ``F.multi_head_attention_forward`` runs on our own projections ``q = query
        W_q^T + b_q`` (and k, v) with identity projection weights, so the masks
        and the attention are PyTorch's own; backpropagating the recorded output
        gradient through it gives ``dq``, ``dk``, ``dv`` and the gradient at the
        output projection's input. Per sample then ``g_Wq = sum_t dq_t query_t^T``
        (k, v alike; the rows of the packed ``in_proj_weight``), ``g_Wo = sum_t
        delta_t attn_t^T`` and the biases' sums over positions.
        """
        m = layer.module
        if m.bias_k is not None:  # bias_k/v are one key/value row for the whole batch: the per-sample vjp
            return super().exact(layer, calls, ctx, accs)
        dt = next(iter(accs.values())).dtype
        E = m.embed_dim
        eye = torch.eye(E, dtype=dt, device=accs[next(iter(accs))].device)
        zero = torch.zeros(3 * E, dtype=dt, device=eye.device)
        f = torch.nn.functional
        uses: dict[str, list] = {}  # attr (or attr[rows]) -> [(a, b)] factors per call
        for call in calls:
            if call.deltas[0] is None:
                continue
            a = _mha_arguments(m, call)
            q, k, v = (a[name].detach().to(dt) for name in ("query", "key", "value"))
            if q.dim() == 2:  # unbatched: a batch of one
                q, k, v = (t.unsqueeze(1) for t in (q, k, v))
                delta = call.deltas[0].to(dt).unsqueeze(1)
            elif m.batch_first:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
                delta = call.deltas[0].to(dt).transpose(0, 1)
            else:
                delta = call.deltas[0].to(dt)
            if m._qkv_same_embed_dim:
                ws = list(m.in_proj_weight.detach().to(dt).chunk(3))
            else:
                ws = [w.detach().to(dt) for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
            bs = list(m.in_proj_bias.detach().to(dt).chunk(3)) if m.in_proj_bias is not None else [None] * 3
            with torch.enable_grad():
                proj = [f.linear(t, w, b).requires_grad_() for t, w, b in zip((q, k, v), ws, bs)]
                attn, _ = f.multi_head_attention_forward(
                    *proj, E, m.num_heads, None, zero, None, None, m.add_zero_attn, 0.0, eye, None, training=False,
                    key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
                    use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                    is_causal=a.get("is_causal", False))
                pre = attn  # with the identity out projection: the output projection's input
                out = f.linear(pre, m.out_proj.weight.detach().to(dt),
                               None if m.out_proj.bias is None else m.out_proj.bias.detach().to(dt))
                dq, dk, dv = torch.autograd.grad(out, proj, delta)
            to_nte = lambda t: t.transpose(0, 1)  # noqa: E731  (L, N, E) -> (N, L, E)
            names = ("q", "k", "v")
            for i, (d, x) in enumerate(zip((dq, dk, dv), (q, k, v))):
                uses.setdefault(names[i], []).append((to_nte(d), to_nte(x)))
            uses.setdefault("out", []).append((to_nte(delta), to_nte(pre.detach())))
        for key, pairs in uses.items():
            a_ = cat_uses([p[0] for p in pairs])
            b_ = cat_uses([p[1] for p in pairs])
            i = "qkv".find(key)
            if key == "out":
                if "out_proj.weight" in accs:
                    ctx.reduce.bmm_(accs["out_proj.weight"], a_, b_, ctx.budget)
                if "out_proj.bias" in accs:
                    ctx.reduce.dense_(accs["out_proj.bias"], a_.sum(1))
                continue
            if m._qkv_same_embed_dim:
                if "in_proj_weight" in accs:
                    ctx.reduce.bmm_(accs["in_proj_weight"][i * E:(i + 1) * E], a_, b_, ctx.budget)
            else:
                wname = f"{key}_proj_weight"
                if wname in accs:
                    ctx.reduce.bmm_(accs[wname], a_, b_, ctx.budget)
            if "in_proj_bias" in accs:
                ctx.reduce.dense_(accs["in_proj_bias"][i * E:(i + 1) * E], a_.sum(1))

    def local(self, layer, call, accs):
        """Hebbian numerators of nn.MultiheadAttention (the Linear convention per projection).

        in-projections: ``|q| |query|^T`` (and k, v) with ``q = query W_q^T + b_q``;
        ``out_proj``: ``|out| |attn|^T`` with ``attn`` the attention output before
        it (recomputed from the call's inputs and masks, without dropout);
        ``bias_k``/``bias_v``: ``|bias|`` per sample.
        """
        m = layer.module
        dt = next(iter(accs.values())).dtype
        a = _mha_arguments(m, call)
        q, k, v = (a[name].detach() for name in ("query", "key", "value"))
        unbatched = q.dim() == 2
        n = 1 if unbatched else q.shape[0 if m.batch_first else 1]
        E = m.embed_dim
        f = torch.nn.functional
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            ws = [("in_proj_weight", slice(0, E)), ("in_proj_weight", slice(E, 2 * E)), ("in_proj_weight", slice(2 * E, 3 * E))]
            weights = [w[:E], w[E:2 * E], w[2 * E:]]
        else:
            ws = [("q_proj_weight", slice(None)), ("k_proj_weight", slice(None)), ("v_proj_weight", slice(None))]
            weights = [m.q_proj_weight, m.k_proj_weight, m.v_proj_weight]
        for (wname, rows), weight, xin, part in zip(ws, weights, (q, k, v), range(3)):
            b = m.in_proj_bias[part * E:(part + 1) * E] if m.in_proj_bias is not None else None
            x2 = xin.reshape(-1, xin.shape[-1]).to(dt)
            y2 = f.linear(x2, weight.detach().to(dt), None if b is None else b.detach().to(dt))
            if wname in accs:
                abs_outer_(accs[wname][rows], y2, x2)
            if "in_proj_bias" in accs:
                accs["in_proj_bias"][part * E:(part + 1) * E].add_(y2.abs().sum(0))
        for name in ("bias_k", "bias_v"):
            if name in accs:
                accs[name].add_(n * getattr(m, name).detach().abs().to(dt))
        if "out_proj.weight" in accs or "out_proj.bias" in accs:
            out = call.outputs[0].detach().to(dt)
            if m.batch_first and not unbatched:
                q_, k_, v_ = (t.transpose(0, 1) for t in (q, k, v))
            else:
                q_, k_, v_ = q, k, v
            eye = torch.eye(E, dtype=dt, device=q.device)
            kw = dict(key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
                      is_causal=a.get("is_causal", False), training=False)
            if not m._qkv_same_embed_dim:
                kw.update(use_separate_proj_weight=True, q_proj_weight=m.q_proj_weight.detach().to(dt),
                          k_proj_weight=m.k_proj_weight.detach().to(dt), v_proj_weight=m.v_proj_weight.detach().to(dt))
            attn, _ = f.multi_head_attention_forward(
                q_.to(dt), k_.to(dt), v_.to(dt), E, m.num_heads,
                None if m.in_proj_weight is None else m.in_proj_weight.detach().to(dt),
                None if m.in_proj_bias is None else m.in_proj_bias.detach().to(dt),
                None if m.bias_k is None else m.bias_k.detach().to(dt),
                None if m.bias_v is None else m.bias_v.detach().to(dt),
                m.add_zero_attn, 0.0, eye, None, **kw)
            if m.batch_first and not unbatched:
                attn = attn.transpose(0, 1)
            a2, o2 = attn.reshape(-1, E), out.reshape(-1, out.shape[-1])
            if "out_proj.weight" in accs:
                abs_outer_(accs["out_proj.weight"], o2, a2)
            if "out_proj.bias" in accs:
                accs["out_proj.bias"].add_(o2.abs().sum(0))


def _mha_arguments(module: nn.MultiheadAttention, call) -> dict:
    bound = inspect.signature(type(module).forward).bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
