"""``ShardedPenalty``: the MAS penalty on this rank's shards of an FSDP2 (DTensor) model.

Importance is estimated on an unsharded replica (one process or DDP) and
saved; each rank then keeps Omega and theta* for its local shards only and
applies the fused penalty to them. See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checkpoint
from ._model import unwrap
from .distributed import local_shard, local_tensor
from .regularizer import Regularizer
from .state import FlatBuffers


def _read_state(state) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """(omega, anchors, metadata) from a ``MAS.save`` file or a ``MAS.state_dict()``."""
    if isinstance(state, dict):
        if "omega" not in state or "anchors" not in state:
            raise ValueError("ShardedPenalty: state must be a MAS.state_dict() (entries 'omega' and 'anchors') "
                             "or the path of a file written by MAS.save()")
        meta = {k: v for k, v in state.items() if k not in checkpoint.PARTS}
        return dict(state["omega"]), dict(state["anchors"]), meta
    parts, meta = checkpoint.read(state, "ShardedPenalty", parts=("omega", "anchors"))
    return parts["omega"], parts["anchors"], meta


class ShardedPenalty:
    r"""The MAS penalty ``lam * sum Omega (theta - theta*)^2`` on this rank's shards of a sharded model.

    For models whose parameters are DTensors (FSDP2 ``fully_shard``; plain
    parameters work too, taken whole). Omega and theta* come from a MAS state
    computed on an unsharded replica: a file written by ``MAS.save()`` or a
    ``MAS.state_dict()``; each rank keeps only its local shards (flat fp32
    Omega, theta* in the parameter's dtype), sliced locally without
    communication.

    Each rank's penalty is the sum over its own shards, so the gradient it
    gives each local shard is exactly that of the full penalty, and no
    communication is needed; the *value* is this rank's part (``all_reduce``
    it, SUM, if you want to log the total). Build it after ``fully_shard``,
    from the sharded model; it holds the sharded parameters, so it may be
    called before or after the forward pass.

    Args:
        model: the (sharded) model; parameter names as in ``named_parameters()``.
        state: path of a ``MAS.save()`` file, or a ``MAS.state_dict()``.
        lam: penalty strength; default: the ``lam`` stored in ``state`` (else 1).
        include_frozen: also penalize parameters with ``requires_grad=False``.

    Parameters the state has no entry for (e.g. a new head) get no penalty and
    are listed in ``self.skipped``; a name the model lacks, a shape that
    differs, or an entry that is not finite (or a negative Omega) raises
    ``ValueError`` naming it.
    """

    def __init__(self, model: nn.Module, state, lam: float | None = None, *, include_frozen: bool = False):
        omega, anchors, meta = _read_state(state)
        params = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad or include_frozen}
        for name in omega:
            if name not in params:
                raise ValueError(f"ShardedPenalty: the state has parameter {name!r}, which the model lacks")
        for name, p in params.items():
            if name in omega and (name not in anchors or tuple(omega[name].shape) != tuple(p.shape)
                                  or tuple(anchors[name].shape) != tuple(p.shape)):
                shape = tuple(omega[name].shape)
                raise ValueError(f"ShardedPenalty: state entry for {name!r} has shape {shape} or no theta*, "
                                 f"the model's parameter has {tuple(p.shape)}")
            if name in omega:  # finite, Omega >= 0, float, real data: a bad entry never loads
                for part, named in (("omega", omega), ("anchors", anchors)):
                    checkpoint.check_tensor("ShardedPenalty", part, name, named[name], tuple(p.shape))
        self.names = [n for n in params if n in omega]
        self.skipped = [n for n in params if n not in omega]
        locals_ = {n: local_tensor(params[n].detach()) for n in self.names}
        specs = [(n, t.shape, t.device, t.dtype) for n, t in locals_.items()]
        self._omega = FlatBuffers(specs, dtype=torch.float32)
        self._anchors = FlatBuffers(specs)
        with torch.no_grad():
            for n in self.names:
                self._omega[n].copy_(local_shard(omega[n].float(), params[n]))
                self._anchors[n].copy_(local_shard(anchors[n], params[n]))
        self._regularizer = Regularizer(
            "ShardedPenalty", [params[n] for n in self.names], [self._anchors[n] for n in self.names],
            [self._omega[n] for n in self.names], float(meta.get("lam", 1.0) if lam is None else lam),
            local=local_tensor)

    @property
    def lam(self) -> float:
        return self._regularizer.lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._regularizer.lam = float(value)

    @property
    def omega(self) -> dict[str, torch.Tensor]:
        """This rank's shard of Omega, by parameter name."""
        return self._omega.views

    @property
    def anchors(self) -> dict[str, torch.Tensor]:
        """This rank's shard of theta*, by parameter name."""
        return self._anchors.views

    def penalty(self) -> torch.Tensor:
        """This rank's part of the penalty, differentiable w.r.t. the local shards (one fused op)."""
        return self._regularizer.penalty()

    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` to each local gradient shard (after ``backward()``).

        Returns this rank's part of the penalty. Parameters without a ``.grad``
        get a zero one first.
        """
        return self._regularizer.add_grad_()

    def __repr__(self) -> str:
        return f"ShardedPenalty(lam={self.lam}, params={len(self.names)}, skipped={len(self.skipped)})"
