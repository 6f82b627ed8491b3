r"""``ZeroPenalty``: the MAS penalty under DeepSpeed ZeRO, on each rank's own partition.

ZeRO keeps the gradients the optimizer steps with in its own partitions
(ZeRO-1/2: flat fp32 fragments of the reduced gradients; ZeRO-3: the local
partition of each parameter) and ignores ``p.grad``: adding the penalty's
gradient to ``.grad`` after ``engine.backward()`` changes the update by
exactly 0. ``ZeroPenalty`` adds ``2 lam Omega (theta - theta*)`` to those
partitions instead, through ZeRO's own accessors, with theta the fp32 master
copy of the same elements:

* ZeRO-3: ``deepspeed.utils.safe_get_local_fp32_param`` /
  ``safe_get_local_grad`` / ``safe_set_local_grad`` on each parameter's
  local partition (elements ``[rank * P, rank * P + P)`` of the flattened
  parameter, ``P`` its partition size);
* ZeRO-1/2: each parameter's fragment in this rank's optimizer partition
  (``param._hp_mapping``: the fp32 master fragment and the reduced gradient
  fragment, elements ``[start, start + numel)`` of the flattened parameter);
* ZeRO-0 (plain data parallel): ``p.grad``.

Each rank keeps Omega (fp32) and theta* for its own elements only, read from
a ``MAS.save()`` file by rows (``safetensors`` slices) or taken from a
``MAS.state_dict()``. No communication; under ZeRO-1/2/3 each rank's
returned value is its part of the penalty (the sum over ranks is the total),
under ZeRO-0 every rank returns the whole penalty.

Call :meth:`ZeroPenalty.add_penalty_grad_` after ``engine.backward(loss)``
and before ``engine.step()``, at a gradient-accumulation boundary (ZeRO-1/2
reduce into their partitions there). Not served (named errors): CPU or NVMe
offload of the optimizer (the partitions live elsewhere), engines whose
parameters carry neither ZeRO accessor.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import checkpoint
from ._model import clean_name, named_parameters
from .options import check_lam


def stage(model) -> int:
    """The ZeRO stage of a ``DeepSpeedEngine`` (0 for anything else)."""
    if type(model).__name__ != "DeepSpeedEngine":
        return 0
    return int(model.zero_optimization_stage() or 0)


def is_zero3(params) -> str | None:
    """The name of the first ZeRO-3 partitioned parameter (``ds_id``), or None."""
    for name, p in params.items():
        if hasattr(p, "ds_id"):
            return name
    return None


def _flat_slice(src, key: str | None, t: torch.Tensor | None, shape: tuple, start: int, numel: int) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of the flattened tensor: from a safetensors file only the rows that
    hold them (``get_slice``), or from a whole tensor ``t``."""
    if t is not None:
        return t.detach().reshape(-1)[start:start + numel].float()
    if numel == 0:
        return torch.zeros(0)
    row = 1
    for d in shape[1:]:
        row *= int(d)
    if not shape:
        return src.get_tensor(key).reshape(-1).float()
    lo, hi = start // row, -(-(start + numel) // row)
    rows = src.get_slice(key)[lo:hi].reshape(-1)
    return rows[start - lo * row:start - lo * row + numel].float()


class ZeroPenalty:
    r"""``lam * sum Omega (theta - theta*)^2`` on this rank's ZeRO partition of a ``DeepSpeedEngine``.

    Args:
        engine: the ``DeepSpeedEngine`` (from ``deepspeed.initialize``).
        state: path of a ``MAS.save()`` file (each rank reads only the rows its elements lie in) or a
            ``MAS.state_dict()`` with whole tensors.
        lam: penalty strength (finite, >= 0); default: the state's ``lam`` (else 1).
        include_frozen: also penalize parameters with ``requires_grad=False``.

    Parameters the state has no entry for get no penalty (``self.skipped``); a name the model lacks or a
    shape that differs raises ``ValueError`` naming it; an engine whose partitions cannot be reached
    raises ``NotImplementedError`` saying why.
    """

    def __init__(self, engine, state, lam: float | None = None, *, include_frozen: bool = False):
        if type(engine).__name__ != "DeepSpeedEngine":
            raise TypeError(f"ZeroPenalty: engine must be a DeepSpeedEngine (deepspeed.initialize), got "
                            f"{type(engine).__name__}; for other models use MAS or ShardedPenalty")
        self.stage = stage(engine)
        if self.stage and engine.zero_cpu_offload():
            raise NotImplementedError("ZeroPenalty: ZeRO offloads the optimizer's partitions to the CPU/NVMe here "
                                      "(offload_optimizer); the penalty needs them in place: turn offload off")
        self.engine = engine
        module: nn.Module = engine.module
        params = {n: p for n, p in named_parameters(module) if p.requires_grad or include_frozen}
        self.lam = lam if lam is None else check_lam(lam, "ZeroPenalty")
        self._parts: list[tuple[str, nn.Parameter, int, int]] = []  # (name, param, start, numel) held here
        omega, anchors, meta = self._read(state, params)
        if self.lam is None:
            self.lam = check_lam(meta.get("lam", 1.0), "ZeroPenalty (the state's lam)")
        self.omegas = [omega[i] for i in range(len(self._parts))]
        self.anchors = [anchors[i] for i in range(len(self._parts))]

    # ----------------------------------------------------------- where
    def _where(self, name: str, p: nn.Parameter) -> tuple[int, int] | None:
        """``(start, numel)`` of this rank's elements of the flattened ``p``, or None for none."""
        if self.stage == 3:
            if not hasattr(p, "ds_id"):
                raise NotImplementedError(f"ZeroPenalty: parameter {name!r} is not partitioned by ZeRO-3 (no ds_id)")
            size = int(p.ds_tensor.ds_numel)
            rank = torch.distributed.get_rank(group=self.engine.data_parallel_group)
            start = rank * size
            numel = max(0, min(int(p.ds_numel) - start, size))
            return (start, numel) if numel else None
        if self.stage in (1, 2):
            if not hasattr(p, "_hp_mapping"):
                raise NotImplementedError(f"ZeroPenalty: parameter {name!r} has no ZeRO-{self.stage} fragment "
                                          "mapping (_hp_mapping); this DeepSpeed optimizer is not served")
            m = p._hp_mapping
            if m is None:
                return None
            return int(m.lp_fragment_address.start), int(m.lp_fragment_address.numel)
        return 0, p.numel()

    def _read(self, state, params: dict) -> tuple[list, list, dict]:
        """This rank's Omega and theta* elements, in ``self._parts`` order."""
        omega, anchors = [], []
        if isinstance(state, dict):
            if "omega" not in state or "anchors" not in state:
                raise ValueError("ZeroPenalty: state must be a MAS.state_dict() or the path of a MAS.save() file")
            whole = {part: {clean_name(n): t for n, t in state[part].items()} for part in ("omega", "anchors")}
            meta = {k: v for k, v in state.items() if k not in checkpoint.PARTS}
            self._collect(params, set(whole["omega"]), lambda part, name: (None, whole[part][name]), omega, anchors,
                          lambda name: tuple(whole["omega"][name].shape))
            return omega, anchors, meta
        from safetensors import safe_open
        import json
        import os

        path = checkpoint.check_path(state, "ZeroPenalty")
        if not os.path.isfile(path):
            raise FileNotFoundError(2, "ZeroPenalty: no such file", path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = f.metadata() or {}
                if raw.get("format") != json.dumps(checkpoint.FORMAT):
                    raise ValueError(f"ZeroPenalty: {path} was not written by mas_kernels.MAS.save")
                names = {k.partition("/")[2] for k in f.keys() if k.startswith("omega/")}
                self._collect(params, names, lambda part, name: (f, None), omega, anchors,
                              lambda name: tuple(f.get_slice(f"omega/{name}").get_shape()))
        except (OSError, ValueError, NotImplementedError):
            raise
        except Exception as exc:  # safetensors' own errors
            raise ValueError(f"ZeroPenalty: {path} is not a readable safetensors file ({exc})") from exc
        return omega, anchors, {k: json.loads(v) for k, v in raw.items()}

    def _collect(self, params: dict, names: set, source, omega: list, anchors: list, shape_of) -> None:
        for name in names:
            if name not in params:
                raise ValueError(f"ZeroPenalty: the state has parameter {name!r}, which the model lacks")
        self.skipped = [n for n in params if n not in names]
        for name, p in params.items():
            if name not in names:
                continue
            shape = shape_of(name)
            full = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            if shape != full:
                raise ValueError(f"ZeroPenalty: state entry for {name!r} has shape {shape}, the model's parameter "
                                 f"has {full}")
            where = self._where(name, p)
            if where is None:
                continue
            start, numel = where
            got = []
            for part in ("omega", "anchors"):
                src, t = source(part, name)
                piece = _flat_slice(src, f"{part}/{name}", t, shape, start, numel)
                checkpoint.check_tensor("ZeroPenalty", part, name, piece, (numel,))
                got.append(piece.to(self._device(p)))
            omega.append(got[0])
            anchors.append(got[1])
            self._parts.append((name, p, start, numel))

    def _device(self, p: nn.Parameter) -> torch.device:
        return p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device

    # ---------------------------------------------------------- penalty
    def add_penalty_grad_(self) -> torch.Tensor:
        """Add ``2 lam Omega (theta - theta*)`` to this rank's gradient partition (after ``engine.backward``);
        return this rank's part of the penalty."""
        if not self._parts:
            return torch.zeros(())
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_grad

            thetas, grads, full = [], [], []
            for name, p, _, numel in self._parts:
                g = safe_get_local_grad(p)
                if g is None:
                    raise RuntimeError(f"ZeroPenalty: no ZeRO-3 gradient partition for {name!r}; call it after "
                                       "engine.backward() at a gradient-accumulation boundary")
                g = g.clone()
                full.append(g)
                thetas.append(safe_get_local_fp32_param(p).reshape(-1)[:numel])
                grads.append(g.reshape(-1)[:numel])
            value = torch.ops.mas_kernels.penalty_grad_(thetas, self.anchors, self.omegas, self.lam, grads)
            for (_, p, _, _), g in zip(self._parts, full):
                safe_set_local_grad(p, g)
            return value
        if self.stage in (1, 2):
            thetas, grads = [], []
            for name, p, _, numel in self._parts:
                m = p._hp_mapping
                g = m.get_lp_grad_fragment(p._index_in_param_group)
                if g is None:
                    raise RuntimeError(f"ZeroPenalty: no ZeRO-{self.stage} gradient fragment for {name!r}; call it "
                                       "after engine.backward() at a gradient-accumulation boundary")
                thetas.append(m.get_hp_fragment().reshape(-1))
                grads.append(g.view(-1))
            return torch.ops.mas_kernels.penalty_grad_(thetas, self.anchors, self.omegas, self.lam, grads)
        grads = []
        for name, p, _, _ in self._parts:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.view(-1))
        return torch.ops.mas_kernels.penalty_grad_([p.detach().view(-1) for _, p, _, _ in self._parts],
                                                   self.anchors, self.omegas, self.lam, grads)

    def __repr__(self) -> str:
        return f"ZeroPenalty(stage={self.stage}, lam={self.lam}, parts={len(self._parts)})"


def refuse_add_grad(stage_: int) -> None:
    """``MAS.add_penalty_grad_`` on a ZeRO engine: ``.grad`` is ignored there, so a named refusal, never 0."""
    raise NotImplementedError(
        f"MAS.add_penalty_grad_: the model is a DeepSpeed ZeRO-{stage_} engine, which steps with its own "
        "gradient partitions and ignores .grad (the penalty would change nothing); after consolidate(), use "
        "pen = mas_kernels.ZeroPenalty(engine, mas.state_dict()) and pen.add_penalty_grad_() after "
        "engine.backward(), or put mas.penalty() into the loss")


__all__: list[Any] = ["ZeroPenalty", "stage"]
