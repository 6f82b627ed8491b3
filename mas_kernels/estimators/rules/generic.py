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

Which dim of each argument and output holds the samples: dim 0 of every
tensor whose size there is N, unless the layer says otherwise
(``nn.MultiheadAttention`` and the RNNs with ``batch_first=False``: dim 1).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...ops import abs_bmm_accumulate_, abs_outer_accumulate_

from .base import Rule, cat_uses


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

    def arg_dims(self, layer, call, n) -> list[int | None]:
        """For each tensor leaf of ``(args, kwargs)``: the dim holding the samples, or None (shared)."""
        leaves = tree_flatten((call.args, call.kwargs))[0]
        return [0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in leaves]

    def out_dims(self, layer, call, n) -> list[int | None]:
        """For each tensor output: the dim holding the samples (None: the output has none)."""
        return [0 if t.dim() > 0 and t.shape[0] == n else None for t in call.outputs]

    def chunk(self, module, ctx, per_sample_bytes=None):
        size = per_sample_bytes or 4 * sum(_maybe(module, a).numel() for a in self.covers(module)) or 1
        return max(1, min(ctx.n, ctx.max_chunk or ctx.n, ctx.budget // (2 * size)))  # vjp's own scratch is about one more copy

    def per_sample(self, layer, calls, ctx, attrs, lo, hi):
        from torch.func import functional_call, vjp, vmap

        module = layer.module
        params = {a: _maybe(module, a).detach() for a in attrs}
        out = {a: torch.zeros((hi - lo, *p.shape), device=p.device) for a, p in params.items()}
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
                    vals[i] = xs[j].unsqueeze(a_dims[i])  # the sample, with a batch dim of 1
                args, kwargs = tree_unflatten(vals, spec)

                def fn(ps_):
                    res = functional_call(module, ps_, args, kwargs, strict=False)
                    flat = [t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)]
                    return tuple(flat[i] for i in keep)

                _, pull = vjp(fn, ps)
                if unbatched:
                    return pull(tuple(ds))[0]
                return pull(tuple(d.unsqueeze(o_dims[i]) for d, i in zip(ds, keep)))[0]

            if unbatched:  # one sample without a batch dim: its gradient is the call's
                grads = {a: g.unsqueeze(0) for a, g in one(params, (), tuple(call.deltas[i] for i in keep)).items()}
            else:
                xs = tuple(leaves[i].detach().movedim(a_dims[i], 0)[lo:hi] for i in batched_idx)
                ds = tuple(call.deltas[i].movedim(o_dims[i], 0)[lo:hi] for i in keep)
                grads = vmap(one, in_dims=(None, 0, 0), randomness="different")(params, xs, ds)
            for a in attrs:
                out[a] += grads[a].float()
        return out


def _maybe(module: nn.Module, path: str):
    try:
        return get_path(module, path)
    except AttributeError:
        return None


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

    def reads(self, layer, x):
        return None if x.dim() == 2 else (0 if layer.module.batch_first else 1)

    def _query_dim(self, layer, call) -> int | None:
        q = call.args[0] if call.args else call.kwargs["query"]
        return self.reads(layer, q)

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
        E = m.embed_dim
        eye = torch.eye(E, dtype=torch.float32, device=accs[next(iter(accs))].device)
        zero = torch.zeros(3 * E, dtype=torch.float32, device=eye.device)
        f = torch.nn.functional
        uses: dict[str, list] = {}  # attr (or attr[rows]) -> [(a, b)] factors per call
        for call in calls:
            if call.deltas[0] is None:
                continue
            a = _mha_arguments(m, call)
            q, k, v = (a[name].detach().float() for name in ("query", "key", "value"))
            if q.dim() == 2:  # unbatched: a batch of one
                q, k, v = (t.unsqueeze(1) for t in (q, k, v))
                delta = call.deltas[0].float().unsqueeze(1)
            elif m.batch_first:
                q, k, v = (t.transpose(0, 1) for t in (q, k, v))
                delta = call.deltas[0].float().transpose(0, 1)
            else:
                delta = call.deltas[0].float()
            if m._qkv_same_embed_dim:
                ws = list(m.in_proj_weight.detach().float().chunk(3))
            else:
                ws = [w.detach().float() for w in (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight)]
            bs = list(m.in_proj_bias.detach().float().chunk(3)) if m.in_proj_bias is not None else [None] * 3
            with torch.enable_grad():
                proj = [f.linear(t, w, b).requires_grad_() for t, w, b in zip((q, k, v), ws, bs)]
                attn, _ = f.multi_head_attention_forward(
                    *proj, E, m.num_heads, None, zero, None, None, m.add_zero_attn, 0.0, eye, None, training=False,
                    key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
                    use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                    is_causal=a.get("is_causal", False))
                pre = attn  # with the identity out projection: the output projection's input
                out = f.linear(pre, m.out_proj.weight.detach().float(),
                               None if m.out_proj.bias is None else m.out_proj.bias.detach().float())
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
                    abs_bmm_accumulate_(accs["out_proj.weight"], a_, b_, memory_budget=ctx.budget)
                if "out_proj.bias" in accs:
                    accs["out_proj.bias"].add_(a_.sum(1).abs().sum(0))
                continue
            if m._qkv_same_embed_dim:
                if "in_proj_weight" in accs:
                    abs_bmm_accumulate_(accs["in_proj_weight"][i * E:(i + 1) * E], a_, b_, memory_budget=ctx.budget)
            else:
                wname = f"{key}_proj_weight"
                if wname in accs:
                    abs_bmm_accumulate_(accs[wname], a_, b_, memory_budget=ctx.budget)
            if "in_proj_bias" in accs:
                accs["in_proj_bias"][i * E:(i + 1) * E].add_(a_.sum(1).abs().sum(0))

    def local(self, layer, call, accs):
        """Hebbian numerators of nn.MultiheadAttention (the Linear convention per projection).

        in-projections: ``|q| |query|^T`` (and k, v) with ``q = query W_q^T + b_q``;
        ``out_proj``: ``|out| |attn|^T`` with ``attn`` the attention output before
        it (recomputed from the call's inputs and masks, without dropout);
        ``bias_k``/``bias_v``: ``|bias|`` per sample.
        """
        m = layer.module
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
            x2 = xin.reshape(-1, xin.shape[-1]).float()
            y2 = f.linear(x2, weight.detach().float(), None if b is None else b.detach().float())
            if wname in accs:
                abs_outer_accumulate_(accs[wname][rows], y2, x2)
            if "in_proj_bias" in accs:
                accs["in_proj_bias"][part * E:(part + 1) * E].add_(y2.abs().sum(0))
        for name in ("bias_k", "bias_v"):
            if name in accs:
                accs[name].add_(n * getattr(m, name).detach().abs().float())
        if "out_proj.weight" in accs or "out_proj.bias" in accs:
            out = call.outputs[0].detach().float()
            if m.batch_first and not unbatched:
                q_, k_, v_ = (t.transpose(0, 1) for t in (q, k, v))
            else:
                q_, k_, v_ = q, k, v
            eye = torch.eye(E, dtype=torch.float32, device=q.device)
            kw = dict(key_padding_mask=a["key_padding_mask"], need_weights=False, attn_mask=a["attn_mask"],
                      is_causal=a.get("is_causal", False), training=False)
            if not m._qkv_same_embed_dim:
                kw.update(use_separate_proj_weight=True, q_proj_weight=m.q_proj_weight.detach().float(),
                          k_proj_weight=m.k_proj_weight.detach().float(), v_proj_weight=m.v_proj_weight.detach().float())
            attn, _ = f.multi_head_attention_forward(
                q_.float(), k_.float(), v_.float(), E, m.num_heads,
                None if m.in_proj_weight is None else m.in_proj_weight.detach().float(),
                None if m.in_proj_bias is None else m.in_proj_bias.detach().float(),
                None if m.bias_k is None else m.bias_k.detach().float(),
                None if m.bias_v is None else m.bias_v.detach().float(),
                m.add_zero_attn, 0.0, eye, None, **kw)
            if m.batch_first and not unbatched:
                attn = attn.transpose(0, 1)
            a2, o2 = attn.reshape(-1, E), out.reshape(-1, out.shape[-1])
            if "out_proj.weight" in accs:
                abs_outer_accumulate_(accs["out_proj.weight"], o2, a2)
            if "out_proj.bias" in accs:
                accs["out_proj.bias"].add_(o2.abs().sum(0))


def _mha_arguments(module: nn.MultiheadAttention, call) -> dict:
    bound = inspect.signature(type(module).forward).bind(module, *call.args, **call.kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
