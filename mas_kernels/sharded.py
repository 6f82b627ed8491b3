"""``ShardedPenalty``: the MAS penalty on this rank's shards of an FSDP2 (DTensor) model, from a saved state.

Importance is estimated anywhere (one process, DDP, or ``MAS`` on FSDP2
shards) and saved; each rank then reads only its local shards' rows of the
file and applies the fused penalty to them. See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checkpoint
from ._model import clean_name, named_parameters, unwrap
from .distributed import is_dtensor, local_shard
from .fsdp import local_view, reshard, rows_of
from .options import check_lam
from .regularizer import Regularizer
from .state import STATE_DTYPES, FlatBuffers


def _read_state(state, want: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, Any]]:
    """(omega, anchors, metadata) from a ``MAS.save`` file or a ``MAS.state_dict()``; from a file, only the rows
    each parameter's local shard needs (``safetensors`` ``get_slice``) and only the parameters ``want`` names."""
    if isinstance(state, dict):
        if "omega" not in state or "anchors" not in state:
            raise ValueError("ShardedPenalty: state must be a MAS.state_dict() (entries 'omega' and 'anchors') "
                             "or the path of a file written by MAS.save()")
        meta = {k: v for k, v in state.items() if k not in checkpoint.PARTS}
        omega = {clean_name(n): t for n, t in state["omega"].items()}
        anchors = {clean_name(n): t for n, t in state["anchors"].items()}
        return omega, anchors, meta
    return _read_rows(checkpoint.check_path(state, "ShardedPenalty"), want)


def _rows(p: torch.Tensor) -> tuple[int, int] | None:
    """The rows of the whole parameter that ``p``'s local shard holds (None: all of it, or not Shard(0))."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        return None
    return rows_of(p)


def _read_rows(path: str, want: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, Any]]:
    import json
    import os

    from safetensors import safe_open

    who = "ShardedPenalty"
    if not os.path.exists(path):
        raise FileNotFoundError(2, f"{who}: no such file", path)
    omega, anchors = {}, {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            if raw.get("format") != json.dumps(checkpoint.FORMAT):
                raise ValueError(f"{who}: {path} was not written by mas_kernels.MAS.save (format {raw.get('format')})")
            keys = set(f.keys())
            for key in keys:
                part, _, name = key.partition("/")
                if part not in checkpoint.PARTS or not name:
                    raise ValueError(f"{who}: {path} has an unexpected entry {key!r}")
                if part == "accumulator":
                    continue
                if name not in want:
                    (omega if part == "omega" else anchors)[name] = None  # named in the file: checked by the caller
                    continue
                p = want[name]
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                rows = _rows(p)
                if rows is not None and shape == tuple(p.shape):
                    t = piece[rows[0]:rows[1]]
                    t.full_shape = shape  # type: ignore[attr-defined]
                else:
                    t = piece[:] if shape else f.get_tensor(key)
                (omega if part == "omega" else anchors)[name] = t
    except (OSError, ValueError):
        raise
    except Exception as exc:  # safetensors raises its own error types on bad headers / sizes
        raise ValueError(f"{who}: {path} is not a readable safetensors file ({exc})") from exc
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as exc:
        raise ValueError(f"{who}: {path} has corrupt metadata ({exc})") from exc
    return omega, anchors, meta


class ShardedPenalty:
    r"""The MAS penalty ``lam * sum Omega (theta - theta*)^2`` on this rank's shards of a sharded model.

    For models whose parameters are DTensors (FSDP2 ``fully_shard``; plain
    parameters work too, taken whole). Omega and theta* come from a MAS state
    (estimated anywhere: one process, DDP, or ``MAS`` on FSDP2 shards): a file
    written by ``MAS.save()``, of which each rank reads only the rows of its
    local shards (``safetensors`` slices), or a ``MAS.state_dict()``. Each rank
    keeps Omega (fp32) and theta* for its local shards only.

    Each rank's penalty is the sum over its own shards, so the gradient it
    gives each local shard is exactly that of the full penalty, and no
    communication is needed; the *value* is this rank's part (``all_reduce``
    it, SUM, if you want to log the total). Build it from the ``fully_shard``-ed
    model, at any time (it reshards the model first and holds the sharded
    parameters, never the unsharded tensors FSDP2 frees).

    Names: wrapper segments (``_checkpoint_wrapped_module.`` of activation
    checkpointing, ``_orig_mod.`` of a compiled block) are left out, so a
    state saved from the bare model applies to the wrapped one.

    Args:
        model: the (sharded) model; parameter names as in ``named_parameters()``.
        state: path of a ``MAS.save()`` file, or a ``MAS.state_dict()``.
        lam: penalty strength (a finite number >= 0); default: the ``lam`` stored in ``state`` (else 1).
        include_frozen: also penalize parameters with ``requires_grad=False``.
        anchor_dtype: storage of theta*: ``None`` (default) the parameter's dtype; ``torch.float32`` keeps the
            file's float32 anchors of a bf16 model unrounded (``bfloat16`` rounds them to 2**-9 relative).

    Parameters the state has no entry for (e.g. a new head) get no penalty and
    are listed in ``self.skipped``; a name the model lacks, a shape that
    differs, or an entry that is not finite (or a negative Omega) raises
    ``ValueError`` naming it.
    """

    def __init__(self, model: nn.Module, state, lam: float | None = None, *, include_frozen: bool = False,
                 anchor_dtype: torch.dtype | None = None):
        if anchor_dtype is not None and anchor_dtype not in STATE_DTYPES:
            raise ValueError(f"ShardedPenalty: anchor_dtype={anchor_dtype!r} must be None (each parameter's dtype), "
                             "torch.float32 or torch.bfloat16")
        if lam is not None:
            lam = check_lam(lam, "ShardedPenalty")
        module = unwrap(model)
        reshard(module)  # never hold the unsharded tensors a no_grad forward leaves on the FSDP2 root
        params = {n: p for n, p in named_parameters(module) if p.requires_grad or include_frozen}
        omega, anchors, meta = _read_state(state, params)
        if lam is None:
            lam = check_lam(meta.get("lam", 1.0), "ShardedPenalty (the state's lam)")
        for name in omega:
            if name not in params:
                raise ValueError(f"ShardedPenalty: the state has parameter {name!r}, which the model lacks")
        local = {}
        for name, p in params.items():
            if name not in omega:
                continue
            if name not in anchors:
                raise ValueError(f"ShardedPenalty: state has Omega for {name!r} but no theta*")
            mine = local_view(p.detach())
            for part, named in (("omega", omega), ("anchors", anchors)):
                t = named[name]
                full = tuple(getattr(t, "full_shape", t.shape))
                if full != tuple(p.shape):
                    raise ValueError(f"ShardedPenalty: state entry {part}[{name!r}] has shape {full}, the model's "
                                     f"parameter has {tuple(p.shape)}")
                if tuple(t.shape) != tuple(mine.shape):  # a whole tensor (state dict, other placements): slice it
                    t = local_shard(t.to_local() if is_dtensor(t) else t, p) if not is_dtensor(t) else t.to_local()
                elif is_dtensor(t):
                    t = t.to_local()
                # finite, Omega >= 0, float, real data: a bad entry never loads
                checkpoint.check_tensor("ShardedPenalty", part, name, t, tuple(mine.shape))
                named[name] = t
            local[name] = mine
        self.names = [n for n in params if n in omega]
        self.skipped = [n for n in params if n not in omega]
        specs = [(n, local[n].shape, local[n].device, local[n].dtype) for n in self.names]
        self._omega = FlatBuffers(specs, dtype=torch.float32)
        self._anchors = FlatBuffers(specs, dtype=anchor_dtype)
        with torch.no_grad():
            for n in self.names:
                self._omega[n].copy_(omega[n])
                self._anchors[n].copy_(anchors[n])
        self._regularizer = Regularizer(
            "ShardedPenalty", [params[n] for n in self.names], [self._anchors[n] for n in self.names],
            [self._omega[n] for n in self.names], lam, local=local_view, names=self.names)

    @property
    def lam(self) -> float:
        return self._regularizer.lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._regularizer.lam = check_lam(value, "ShardedPenalty")
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
