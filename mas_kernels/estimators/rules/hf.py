"""Rules for layer types of transformers (registered once ``transformers`` is imported).

* ``Conv1D`` (GPT-2's projections): a Linear with the weight stored (I, J).
* ``ViTEmbeddings``: ``cls_token`` and ``position_embeddings`` (and
  ``mask_token``) are parameters the module reads directly. Exact: the module
  adds them to its output (``cat(cls, patches) + position_embeddings``, then
  dropout), so without masked positions, interpolation or dropout sample k's
  gradients are its output gradient's row 0 and the whole of it; else the
  module-local per-sample vjp. Local (the bias convention, they are added to
  the patch embeddings): ``sum |y|`` over samples of the positions each one
  reaches: ``y[:, 0]`` for the class token, every position for the position
  embeddings, the masked positions for the mask token.
"""

from __future__ import annotations

import sys

import torch

from .base import register_rule
from .generic import GenericRule
from .linear import Conv1DRule


class ViTEmbeddingsRule(GenericRule):
    local_supported = True

    def __init__(self):
        super().__init__(("cls_token", "position_embeddings", "mask_token"))

    def exact(self, layer, calls, ctx, accs):
        m = layer.module
        if not all(_adds_only(m, c, ctx.n) for c in calls) or "mask_token" in accs:
            return super().exact(layer, calls, ctx, accs)
        deltas = [c.deltas[0] for c in calls if c.deltas[0] is not None]
        if not deltas:
            return
        d = deltas[0] if len(deltas) == 1 else torch.stack(deltas).sum(0)  # (N, 1 + P, D): the sample's gradient
        for a, acc in accs.items():
            g = d[:, :1] if a == "cls_token" else d  # (N, 1, D) / (N, 1 + P, D): acc's shape, samples first
            # a copy: the reduction works in place, and the gradients below this one are views of it
            ctx.reduce.dense_(acc, g.to(acc.dtype, copy=True).reshape(ctx.n, *acc.shape))

    def local(self, layer, call, accs):
        y = call.outputs[0].detach().float().abs()  # (N, 1 + P, D)
        if "cls_token" in accs:
            accs["cls_token"].add_(y[:, :1].sum(0, keepdim=True))
        if "position_embeddings" in accs:
            if y.shape[1:] != accs["position_embeddings"].shape[1:]:
                raise ValueError(f"MAS: layer {layer.name!r} interpolated its position embeddings; the local "
                                 "rule needs interpolate_pos_encoding=False")
            accs["position_embeddings"].add_(y.sum(0, keepdim=True))
        masked = call.kwargs.get("bool_masked_pos", call.args[1] if len(call.args) > 1 else None)
        if "mask_token" in accs and masked is not None:
            m = masked.to(y.dtype).unsqueeze(-1)  # (N, P, 1)
            accs["mask_token"].add_((y[:, 1:] * m).sum((0, 1)).view_as(accs["mask_token"]))


def _adds_only(m, call, n: int) -> bool:
    """Whether the call's output is ``cat(cls_token, patches) + position_embeddings`` as it is, samples in dim 0
    (no masked positions, no interpolated position embeddings, no dropout at work)."""
    kw = call.kwargs
    masked = kw.get("bool_masked_pos", call.args[1] if len(call.args) > 1 else None)
    interp = kw.get("interpolate_pos_encoding", call.args[2] if len(call.args) > 2 else False)
    drop = getattr(m, "dropout", None)
    out = call.outputs[0] if call.outputs else None
    return (masked is None and not interp and call.dims is not None and call.dims.out == 0
            and out is not None and out.dim() == 3 and out.shape[0] == n
            and tuple(out.shape[1:]) == tuple(m.position_embeddings.shape[1:])
            and (drop is None or not m.training or getattr(drop, "p", 0) == 0))


def register_optional(registered: dict) -> None:
    """Register the rules of the transformers layer types that are imported by now."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None) if utils is not None else None
    if conv1d is not None and conv1d not in registered:
        register_rule(conv1d, Conv1DRule())
    vit = sys.modules.get("transformers.models.vit.modeling_vit")
    emb = getattr(vit, "ViTEmbeddings", None) if vit is not None else None
    if emb is not None and emb not in registered:
        register_rule(emb, ViTEmbeddingsRule())
