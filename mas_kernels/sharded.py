"""``ShardedPenalty``: the MAS penalty on this rank's shards of an FSDP2 (DTensor) model, from a saved state.

Importance is estimated anywhere (one process, DDP, or ``MAS`` on FSDP2
shards) and saved; each rank then reads only its local shards' rows of the
file and applies the fused penalty to them. See ``docs/distributed.md``.
"""

from __future__ import annotations


import torch
from torch import nn

from . import checkpoint
from ._model import clean_name, named_parameters, unwrap
from .distributed import is_dtensor, local_shard
from .fsdp import local_data, local_view, reshard, rows_of
from .options import check_lam
from .regularizer import Regularizer
from .state import STATE_DTYPES, FlatBuffers


class _Source:
    """Where Omega and theta* come from: a ``MAS.state_dict()`` or a ``MAS.save()`` file, one entry at a time
    (from a file only the rows a local shard needs, through ``safetensors`` ``get_slice``), so that at most one
    parameter's entry is held besides the penalty's own buffers."""

    def __init__(self, state):
        self.file = None
        if isinstance(state, dict):
            if "omega" not in state or "anchors" not in state:
                raise ValueError("ShardedPenalty: state must be a MAS.state_dict() (entries 'omega' and 'anchors') "
                                 "or the path of a file written by MAS.save()")
            self.meta = {k: v for k, v in state.items() if k not in checkpoint.PARTS}
            self.whole = {part: {clean_name(n): t for n, t in state[part].items()} for part in ("omega", "anchors")}
            self.names = {part: list(self.whole[part]) for part in ("omega", "anchors")}
            return
        import json
        import os

        from safetensors import safe_open

        path = checkpoint.check_path(state, "ShardedPenalty")
        if not os.path.exists(path):
            raise FileNotFoundError(2, "ShardedPenalty: no such file", path)
        self.path = path
        try:
            self.file = safe_open(path, framework="pt", device="cpu").__enter__()
            raw = self.file.metadata() or {}
            if raw.get("format") != json.dumps(checkpoint.FORMAT):
                raise ValueError(f"ShardedPenalty: {path} was not written by mas_kernels.MAS.save "
                                 f"(format {raw.get('format')})")
            self.names = {"omega": [], "anchors": []}
            for key in self.file.keys():
                part, _, name = key.partition("/")
                if part not in checkpoint.PARTS or not name:
                    raise ValueError(f"ShardedPenalty: {path} has an unexpected entry {key!r}")
                if part in self.names:
                    self.names[part].append(name)
            self.meta = {k: json.loads(v) for k, v in raw.items()}
        except (OSError, ValueError):
            self.close()
            raise
        except Exception as exc:  # safetensors raises its own error types on bad headers / sizes
            self.close()
            raise ValueError(f"ShardedPenalty: {path} is not a readable safetensors file ({exc})") from exc

    def shape(self, part: str, name: str) -> tuple:
        if self.file is None:
            return tuple(self.whole[part][name].shape)
        return tuple(self.file.get_slice(f"{part}/{name}").get_shape())

    def local(self, part: str, name: str, p: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The entry's part that the local shard ``like`` of parameter ``p`` holds."""
        if self.file is None:
            t = self.whole[part][name]
            if is_dtensor(t):
                return t.to_local()
            return t if tuple(t.shape) == tuple(like.shape) else local_shard(t, p)
        try:
            piece = self.file.get_slice(f"{part}/{name}")
            rows = _rows(p)
            if rows is not None:
                return piece[rows[0]:rows[1]]
            t = piece[:] if piece.get_shape() else self.file.get_tensor(f"{part}/{name}")
        except Exception as exc:
            raise ValueError(f"ShardedPenalty: {self.path}: {part}[{name!r}] cannot be read ({exc})") from exc
        return t if tuple(t.shape) == tuple(like.shape) else local_shard(t, p)

    def close(self) -> None:
        if self.file is not None:
            self.file.__exit__(None, None, None)
            self.file = None


def _rows(p: torch.Tensor) -> tuple[int, int] | None:
    """The rows of the whole parameter that ``p``'s local shard holds (None: all of it, or not Shard(0))."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        return None
    return rows_of(p)


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
        src = _Source(state)
        try:
            if lam is None:
                lam = check_lam(src.meta.get("lam", 1.0), "ShardedPenalty (the state's lam)")
            for name in src.names["omega"]:
                if name not in params:
                    raise ValueError(f"ShardedPenalty: the state has parameter {name!r}, which the model lacks")
            self.names = [n for n in params if n in src.names["omega"]]
            self.skipped = [n for n in params if n not in src.names["omega"]]
            local = {n: local_view(params[n].detach()) for n in self.names}
            for name in self.names:
                if name not in src.names["anchors"]:
                    raise ValueError(f"ShardedPenalty: state has Omega for {name!r} but no theta*")
                for part in ("omega", "anchors"):
                    if src.shape(part, name) != tuple(params[name].shape):
                        raise ValueError(f"ShardedPenalty: state entry {part}[{name!r}] has shape "
                                         f"{src.shape(part, name)}, the model's parameter has "
                                         f"{tuple(params[name].shape)}")
            specs = [(n, local[n].shape, local[n].device, local[n].dtype) for n in self.names]
            self._omega = FlatBuffers(specs, dtype=torch.float32)
            self._anchors = FlatBuffers(specs, dtype=anchor_dtype)
            with torch.no_grad():
                for name in self.names:  # one entry at a time: finite, Omega >= 0, real data, then copied
                    for part, store in (("omega", self._omega), ("anchors", self._anchors)):
                        t = src.local(part, name, params[name], local[name])
                        checkpoint.check_tensor("ShardedPenalty", part, name, t, tuple(local[name].shape))
                        store[name].copy_(t)
                        del t
        finally:
            src.close()
        self._regularizer = Regularizer(
            "ShardedPenalty", [params[n] for n in self.names], [self._anchors[n] for n in self.names],
            [self._omega[n] for n in self.names], lam, local=local_view, names=self.names, local_data=local_data)

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
