r"""``nn.MultiheadAttention``: its projections (in_proj/q/k/v, out_proj, bias_k/v), all through its own call.

Exact: in the recorded pass the layer runs :meth:`MultiheadAttentionRule.inline_forward`, the
steps of ``F.multi_head_attention_forward`` written out, so the one backward gives the gradients
at the in-projections' and the out-projection's outputs (no second attention); then one fused
per-sample product per projection weight. Where it cannot stand in for the module (``bias_k``/
``bias_v``, ``add_zero_attn``, dropout in train mode, a subclass's own forward), the attention is
replayed around its own projections after the pass (``F.multi_head_attention_forward`` with identity
projection weights). ``bias_k``/``bias_v`` (one key/value row for the whole batch): the module-local
per-sample vjp. Local: each projection as a Linear. Where the samples are comes from the module's
API (``batch_first``).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ..capture import _store
from .base import abs_outer_, cat_uses
from .generic import GenericRule

F = torch.nn.functional


class _Taps:
    """What :meth:`MultiheadAttentionRule.inline_forward` left on a call: per projection its input and the
    slot its output's gradient lands in (a tensor hook), as ``(key, x, rows, out, slot)``; ``x`` and ``out``
    (L, N, .), ``rows`` the projection's rows of its weight (None: all)."""

    def __init__(self):
        self.taps: list = []
        self.grads: list = []

    def tap(self, key: str, x: torch.Tensor, rows, out: torch.Tensor) -> None:
        i = len(self.grads)
        self.grads.append(None)
        if out.requires_grad:
            out.register_hook(_store(self.grads, i))
        self.taps.append((key, x.detach(), rows, out))

    def targets(self) -> list:
        return [t[3] for t in self.taps if t[3].requires_grad]

    def uses(self, dt):
        """``(key, rows, a, b)`` per projection: ``a`` (N, L, J) its output gradient, ``b`` (N, L, I) its input."""
        out = []
        for (key, x, rows, y), g in zip(self.taps, self.grads):
            g = torch.zeros_like(y) if g is None else g
            out.append((key, rows, g.to(dt).transpose(0, 1), x.to(dt).transpose(0, 1)))
        return out


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

    def inline_forward(self, layer, args: tuple, kwargs: dict):
        """The layer's forward in the exact rule's recorded pass: ``nn.MultiheadAttention.forward`` and
        ``F.multi_head_attention_forward``'s steps (its slow path: the fast path never runs while a tracked
        parameter requires grad), with a tensor hook on each projection's output; ``(outputs, taps)``. The
        module's own forward (and no taps: the replay after the pass) where the steps would not be its own."""
        m = layer.module
        if not _inlinable(m):
            return type(m).forward(m, *args, **kwargs), None
        a = _mha_arguments(m, Call_(args, kwargs))
        return _attention(m, a, _Taps())

    def exact(self, layer, calls, ctx, accs):
        """The gradients at the projections' outputs (recorded by :meth:`inline_forward`, else from the
        attention replayed around its projections), then one abs_bmm per projection weight.

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
        uses: dict = {}  # (key, rows) -> [(a, b)] factors per call
        for call in calls:
            if isinstance(call.replay, _Taps):
                for key, rows, a_, b_ in call.replay.uses(dt):
                    uses.setdefault((key, rows), []).append((a_, b_))
                continue
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
                uses.setdefault((names[i], None), []).append((to_nte(d), to_nte(x)))
            uses.setdefault(("out", None), []).append((to_nte(delta), to_nte(pre.detach())))
        for (key, rows), pairs in uses.items():
            a_ = cat_uses([p[0] for p in pairs])
            b_ = cat_uses([p[1] for p in pairs])
            if key == "out":
                if "out_proj.weight" in accs:
                    ctx.reduce.bmm_(accs["out_proj.weight"], a_, b_, ctx.budget)
                if "out_proj.bias" in accs:
                    ctx.reduce.dense_(accs["out_proj.bias"], a_.sum(1))
                continue
            # rows of the packed in_proj_weight / in_proj_bias: q, k, v (or several, "in")
            lo, hi = rows if rows is not None else ("qkv".find(key) * E, ("qkv".find(key) + 1) * E)
            if m._qkv_same_embed_dim:
                if "in_proj_weight" in accs:
                    ctx.reduce.bmm_(accs["in_proj_weight"][lo:hi], a_, b_, ctx.budget)
            else:
                wname = f"{key}_proj_weight"
                if wname in accs:
                    ctx.reduce.bmm_(accs[wname], a_, b_, ctx.budget)
            if "in_proj_bias" in accs:
                ctx.reduce.dense_(accs["in_proj_bias"][lo:hi], a_.sum(1))

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


class Call_:
    """The arguments of a call, for :func:`_mha_arguments` (the forward has not returned yet)."""

    def __init__(self, args, kwargs):
        self.args, self.kwargs = args, kwargs


def _inlinable(m: nn.Module) -> bool:
    """Whether :func:`_attention` computes what ``m``'s own forward does."""
    return (type(m).forward is nn.MultiheadAttention.forward and m.bias_k is None and m.bias_v is None
            and not m.add_zero_attn and not (m.training and m.dropout > 0))


def _attention(m: nn.MultiheadAttention, a: dict, taps: _Taps):
    """``m(**a)`` as ``nn.MultiheadAttention.forward`` and ``F.multi_head_attention_forward`` (torch 2.x slow
    path) compute it, without ``bias_k``/``bias_v``, ``add_zero_attn`` or dropout; each projection's input and
    output recorded in ``taps`` (keys ``"q"``, ``"k"``, ``"v"``, ``"in"`` (packed rows), ``"out"``)."""
    query, key, value = a["query"], a["key"], a["value"]
    need_weights, average, is_causal = a["need_weights"], a["average_attn_weights"], a.get("is_causal", False)
    key_padding_mask = F._canonical_mask(mask=a["key_padding_mask"], mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(a["attn_mask"]), other_name="attn_mask",
                                         target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=a["attn_mask"], mask_name="attn_mask", other_type=None, other_name="",
                                  target_type=query.dtype, check_other=False)
    batched = query.dim() == 3
    if m.batch_first and batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    # F.multi_head_attention_forward from here.
    H = m.num_heads
    batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, H)
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S = key.shape[0]
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if E != m.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {m.embed_dim}, but got {E}")
    hd = E // H
    w, b = m.in_proj_weight, m.in_proj_bias
    if m._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if key is value and query is key:  # self-attention: one packed projection
            proj = F.linear(query, w, b)
            taps.tap("in", query, (0, 3 * E), proj)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = proj[0], proj[1], proj[2]
        elif key is value:  # encoder-decoder attention: q, then k and v packed
            w_q, w_kv = w.split([E, E * 2])
            b_q, b_kv = (None, None) if b is None else b.split([E, E * 2])
            q = F.linear(query, w_q, b_q)
            taps.tap("in", query, (0, E), q)
            kv = F.linear(key, w_kv, b_kv)
            taps.tap("in", key, (E, 3 * E), kv)
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            ws = w.chunk(3)
            bs = (None,) * 3 if b is None else b.chunk(3)
            q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
            for i, (x, y) in enumerate(zip((query, key, value), (q, k, v))):
                taps.tap("in", x, (i * E, (i + 1) * E), y)
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        bs = (None,) * 3 if b is None else b.chunk(3)
        ws = (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)
        q, k, v = (F.linear(x, wi, bi) for x, wi, bi in zip((query, key, value), ws, bs))
        for i, (x, y) in enumerate(zip((query, key, value), (q, k, v))):
            taps.tap("qkv"[i], x, (i * E, (i + 1) * E), y)
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (N * H, L, S):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(N * H, L, S)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    q = q.view(L, N * H, hd).transpose(0, 1)
    k = k.view(k.shape[0], N * H, hd).transpose(0, 1)
    v = v.view(v.shape[0], N * H, hd).transpose(0, 1)
    if key_padding_mask is not None:
        F._check_key_padding_mask(key_padding_mask, S, N)
        key_padding_mask = key_padding_mask.view(N, 1, 1, S).expand(-1, H, -1, -1).reshape(N * H, 1, S)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(hd))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        pre = torch.bmm(weights, v).transpose(0, 1).reshape(L * N, E)
        weights = weights.view(N, H, L, S)
        if average:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(N, H, -1, S)
        q, k, v = q.view(N, H, L, hd), k.view(N, H, S, hd), v.view(N, H, S, hd)
        pre = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        pre = pre.permute(2, 0, 1, 3).reshape(N * L, E)
    out = F.linear(pre, m.out_proj.weight, m.out_proj.bias).view(L, N, E)
    taps.tap("out", pre.view(L, N, E), None, out)
    if not batched:
        out = out.squeeze(1)
    elif m.batch_first:
        out = out.transpose(1, 0)
    return (out, weights), taps
