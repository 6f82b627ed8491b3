"""torch.distributed support: importance over all ranks, as one process over all the data.

DDP (and any data-parallel setup where every rank holds the whole model)
    Each rank accumulates importance *numerators* (sums over its own samples)
    and its sample count; ``MAS.consolidate()`` sums both over the ranks (one
    ``all_reduce`` per flat buffer plus one small ``all_gather`` for the counts
    and a layout check), so every rank divides the same total by the same N
    and ends with the Omega one process would get over the union of the data,
    for every importance rule. Estimation itself never communicates: it runs
    on the unwrapped module with ``torch.autograd.grad`` / ``torch.func`` (never
    ``.backward()``), so DDP's gradient buckets are untouched and ranks may see
    different numbers of batches, or none. The penalty is elementwise on each
    replica: no communication either.

FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters)
    ``MAS`` keeps the state per local shard and estimates on the shards
    (:mod:`mas_kernels.fsdp`); ``ShardedPenalty`` (``sharded.py``) applies a
    saved state's penalty to the shards of any FSDP2 model. See
    ``docs/distributed.md``.

Which group: collectives only over ``process_group=`` when given, else the
group of a DDP wrapper, else an FSDP2 model's mesh, else none (a wrapper on
one rank alone never waits for the others); see :func:`group_for`.

This module holds collectives and sharding checks only; it imports nothing
from the wrapper.
"""

from __future__ import annotations

import json
import sys
import warnings
import zlib
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .state import FlatBuffers


# ------------------------------------------------------------------- groups
def active(group=None) -> bool:
    """True when torch.distributed is initialized with more than one rank in ``group`` (``None``: the
    default group; ``False``: no group, never active)."""
    if group is False:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_main_process(group=None) -> bool:
    """Rank 0 of ``group``, or the only process when torch.distributed is not in use."""
    return not active(group) or dist.get_rank(group) == 0


def barrier(group=None) -> None:
    if active(group):
        dist.barrier(group=group)


def _comm_device(group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo, mpi and mixed "cpu:gloo,cuda:nccl" groups take CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _src(group) -> int:
    """Global rank of ``group``'s rank 0 (collectives take global ranks)."""
    if group is None or group is dist.group.WORLD:
        return 0
    return dist.get_global_rank(group, 0)


def main_process_only(fn: Callable[[], Any], group=None, what: str = "MAS") -> Any:
    """Run ``fn`` on rank 0 of ``group`` while the other ranks wait for it.

    Unlike ``fn(); barrier()``, a failure on rank 0 does not leave the others
    waiting for a barrier that never comes: rank 0 re-raises its own error and
    every other rank raises a ``RuntimeError`` saying rank 0 failed. Returns
    ``fn()``'s result on rank 0 and ``None`` elsewhere.
    """
    if not active(group):
        return fn()
    result, error = None, None
    if dist.get_rank(group) == 0:
        try:
            result = fn()
        except BaseException as exc:  # reported to every rank below, then re-raised here
            error = exc
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=_comm_device(group))
    dist.broadcast(flag, src=_src(group), group=group)
    if error is not None:
        raise error
    if int(flag.item()):
        raise RuntimeError(f"{what}: rank 0 failed (its own error is raised there)")
    return result


# ---------------------------------------------------------- importance sums
def group_for(model: nn.Module, process_group=None):
    """The process group a MAS wrapper's ``consolidate()``/``save()`` communicate over, or False for none.

    Collectives only where the ranks are known to hold one model: ``process_group`` when given;
    else the group of a ``DistributedDataParallel`` wrapper around ``model`` (or a DeepSpeed
    engine's data-parallel group); else, for an FSDP2
    model, its mesh's group (:mod:`mas_kernels.fsdp` finds it); else none, so a wrapper made on one
    rank alone (``if rank == 0: MAS(model).estimate(...).save(path)``) never waits for the others.
    ``process_group=False``: never communicate (this rank's own importance).
    """
    if process_group is False:
        return False
    if process_group is not None:
        return process_group
    m = model
    while True:
        if isinstance(m, nn.parallel.DistributedDataParallel):
            return m.process_group
        if type(m).__name__ == "DeepSpeedEngine":
            return getattr(m, "data_parallel_group", None) or dist.group.WORLD
        inner = None
        if hasattr(m, "_orig_mod") and isinstance(m._orig_mod, nn.Module):
            inner = m._orig_mod
        if inner is None:
            return False
        m = inner


def trainer_group():
    """The group an integration's wrapper sums over: the default group in a multi-rank job (a trainer runs
    every rank on one model, DDP or not), else None; the user's own ``process_group=`` takes precedence."""
    return dist.group.WORLD if active() else None


def same_group(a, b) -> bool:
    """Whether two process groups hold the same ranks (the default group and a 1-D mesh's over all ranks)."""
    if a is b:
        return True
    try:
        return dist.get_process_group_ranks(a) == dist.get_process_group_ranks(b)
    except (RuntimeError, ValueError, AttributeError):
        return False


def warn_unwrapped(group, process_group, sharded: bool) -> None:
    """A wrapper on a plain model inside a multi-rank job communicates with no one: say so once, since
    ranks that each estimate on their own data then hold different Omegas (pass ``process_group``)."""
    if group is False and process_group is None and not sharded and active():
        warnings.warn(
            f"MAS: torch.distributed runs {dist.get_world_size()} ranks, but the model is neither DDP-wrapped nor "
            "FSDP2-sharded and no process_group= was given, so consolidate() and save() stay on this rank (each "
            "rank keeps the importance of its own data). Pass the DDP wrapper, or process_group=dist.group.WORLD "
            "to sum over the ranks, or process_group=False to keep this rank alone without this warning",
            RuntimeWarning, stacklevel=4)


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _layout(views: dict) -> int:
    """A checksum of names, shapes and dtypes: equal on ranks that hold the same model."""
    return _crc(json.dumps([[name, list(view.shape), str(view.dtype)] for name, view in views.items()]))


def _wait(work, timeout: float | None, who: str, group) -> None:
    """Wait for an async collective; past ``timeout`` seconds a ``TimeoutError`` naming ``who``."""
    if timeout is None:
        work.wait()
        return
    try:
        work.wait(timeout=timedelta(seconds=float(timeout)))
    except RuntimeError as exc:
        if "timed out" not in str(exc).lower() and "timeout" not in str(exc).lower():
            raise
        raise TimeoutError(
            f"{who}: not every rank of the process group (world size {dist.get_world_size(group)}) reached "
            f"{who} within timeout={timeout} s; every rank must call it (a rank that skipped it, crashed or "
            "is still busy keeps the others waiting). The process group cannot be used for further "
            "collectives after this; end the job") from exc


def all_reduce_importance(acc: FlatBuffers, counts: int | tuple[int, ...], group=None, *, names=None,
                          fingerprint: str = "", timeout: float | None = None,
                          who: str = "MAS.consolidate") -> int | tuple[int, ...]:
    """Sum the accumulators and the counts over ranks in place; return the total count(s).

    ``counts``: the sample count N, or a tuple of counts (e.g. samples and
    batches); the same kind comes back. ``names``: sum only these entries
    (default: every buffer). One ``all_gather`` of a few integers per rank
    (the counts, number of tensors, elements, a layout checksum and a
    checksum of ``fingerprint``, the wrapper's options) checks that every
    rank tracks the same parameters with the same options, so a mismatch
    raises the same clear error on every rank instead of hanging in, or
    silently mis-adding, the buffer all-reduces; then one ``all_reduce``
    (sum) per flat buffer (or one over the packed ``names``). Every rank of
    ``group`` must call it (``MAS.consolidate()`` does), whatever its number
    of samples, zero included; ``timeout`` (seconds) bounds the wait for the
    others in the first collective (``TimeoutError`` naming ``who``).
    """
    single = not isinstance(counts, tuple)
    counts = (counts,) if single else counts
    if not active(group):
        return int(counts[0]) if single else tuple(int(c) for c in counts)
    device = _comm_device(group)
    views = acc.views if names is None else {n: acc[n] for n in names}
    numel = sum(v.numel() for v in views.values())
    k = len(counts)
    mine = torch.tensor([*map(int, counts), len(views), numel, _layout(views), _crc(fingerprint)],
                        dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(every, mine, group=group, async_op=True), timeout, who, group)
    table = torch.stack(every).cpu()
    if not bool((table[:, k:k + 3] == table[0, k:k + 3]).all()):
        bad = int((table[:, k:k + 3] != table[0, k:k + 3]).any(dim=1).nonzero()[0, 0])
        raise RuntimeError(
            f"{who}: ranks track different parameters (rank 0: "
            f"{int(table[0, k])} tensors, {int(table[0, k + 1])} elements; rank {bad}: "
            f"{int(table[bad, k])} tensors, {int(table[bad, k + 1])} elements, or other names/shapes/dtypes); "
            "every rank must wrap the same model with the same MAS options"
        )
    if not bool((table[:, k + 3] == table[0, k + 3]).all()):
        bad = [r for r in range(len(every)) if int(table[r, k + 3]) != int(table[0, k + 3])]
        raise RuntimeError(
            f"{who}: ranks {bad} were made with other MAS options or hold other consolidated tasks than rank 0 "
            f"(this rank {dist.get_rank(group)}: {fingerprint}); every rank must build the wrapper with the same "
            "options (importance, combine, normalization, tracked parameters...) and load the same state, or "
            "their Omega would differ"
        )
    if names is None:
        for buf in acc.buffers.values():
            if buf.device.type == "cpu" and device.type == "cuda":  # a CPU-resident parameter under NCCL
                tmp = buf.to(device)
                dist.all_reduce(tmp, group=group)
                buf.copy_(tmp)
            else:
                dist.all_reduce(buf, group=group)
    elif views:
        flat = torch.cat([v.reshape(-1).float().to(device) for v in views.values()])
        dist.all_reduce(flat, group=group)
        start = 0
        for v in views.values():
            v.copy_(flat[start:start + v.numel()].view_as(v))
            start += v.numel()
    totals = tuple(int(c) for c in table[:, :k].sum(0))
    return totals[0] if single else totals


def raise_rejected(state, group=None) -> None:
    """Raise the deferred error of a rejected batch (``state.check_finite()``); under torch.distributed
    warn instead: the collectives that follow need every rank, so one rank raising would leave the
    others waiting."""
    if not active(group):
        state.check_finite()
        return
    try:
        state.check_finite()
    except FloatingPointError as exc:
        rank = dist.get_rank(group)
        warnings.warn(f"{exc} [rank {rank}: going on without it, so that every rank stays in step]",
                      RuntimeWarning, stacklevel=3)


def save_over_ranks(path, sd: dict, meta: dict, group=None, *, fingerprint: str = "",
                    timeout: float | None = None) -> None:
    """``MAS.save``: the open accumulator (each rank's own samples) summed over the ranks, as one process
    would hold it, then rank 0 writes while the others wait (its error raised on every rank)."""
    sd["accumulator"], (num_samples, num_batches) = summed_over_ranks(
        sd["accumulator"], (sd["num_samples"], sd["num_batches"]), group, fingerprint=fingerprint,
        timeout=timeout, who="MAS.save")
    parts = {part: sd[part] for part in checkpoint.PARTS}
    meta = {**meta, "num_samples": num_samples, "num_batches": num_batches}
    main_process_only(lambda: checkpoint.write(path, parts, meta, "MAS.save"), group, "MAS.save")


def keep_open_task_on_rank0(state, group=None) -> None:
    """After ``MAS.load``: a file's open accumulator is the sum over the ranks that saved it, so rank 0
    alone keeps it and the next ``consolidate()`` counts those samples once."""
    if not is_main_process(group):
        state.release(staging=False)
        state.num_samples = state.num_batches = 0


def summed_over_ranks(named: dict[str, torch.Tensor], counts: int | tuple[int, ...], group=None, **handshake
                      ) -> tuple[dict[str, torch.Tensor], int | tuple[int, ...]]:
    """Per-name tensors and count(s) summed over ranks, as new tensors (the inputs are not changed).

    For ``MAS.save()`` mid-task: each rank's open accumulator holds its own
    samples, and the file gets their sum, what one process would hold. Same
    collectives as :func:`all_reduce_importance`. Without torch.distributed the
    inputs come back unchanged.
    """
    if not active(group):
        return named, counts
    flat = FlatBuffers([(n, t.shape, t.device, t.dtype) for n, t in named.items()])
    with torch.no_grad():
        for n, t in named.items():
            flat[n].copy_(t)
    total = all_reduce_importance(flat, counts, group, **handshake)
    return dict(flat.items()), total


# ------------------------------------------------------------- DTensor / FSDP2
def _dtensor_type():
    # Only where torch.distributed.tensor is already imported: a DTensor cannot exist otherwise,
    # and plain single-process use pays no import.
    for mod in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(mod), "DTensor", None)
        if cls is not None:
            return cls
    return None


def is_dtensor(t) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard``, tensor parallel) or a Parameter wrapping one."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def first_dtensor(named: dict[str, torch.Tensor]) -> str | None:
    """Name of the first DTensor in ``named``, or None."""
    if _dtensor_type() is None:
        return None
    for name, t in named.items():
        if is_dtensor(t):
            return name
    return None


_SHARDED_HELP = (
    "the MAS wrapper takes whole parameters (single process, DDP) or FSDP2 (fully_shard) shards. Use "
    "FSDP2's fully_shard instead, or estimate on an unsharded replica, save() it, and apply the penalty "
    "with mas_kernels.ShardedPenalty(model, path); see docs/distributed.md"
)


def reject_dtensors(named: dict[str, torch.Tensor], who: str = "MAS") -> None:
    """Raise a clear ``NotImplementedError`` if any parameter is a DTensor (FSDP2 / tensor parallel)."""
    name = first_dtensor(named)
    if name is None:
        return
    p = named[name]
    raise NotImplementedError(
        f"{who}: parameter {name!r} is a DTensor sharded over {p.device_mesh} with placements "
        f"{tuple(p.placements)} (FSDP2 fully_shard or tensor parallel); {_SHARDED_HELP}"
    )


def check_unsharded(module: nn.Module, named: dict[str, torch.Tensor], who: str = "MAS",
                    dtensors: bool = True) -> None:
    """Raise ``NotImplementedError`` for FSDP1 wrappers, and (``dtensors``) for DTensor parameters.

    FSDP1 (``FullyShardedDataParallel``) flattens and shards parameters, so the
    names and shapes MAS would see are not the model's (``..._flat_param``);
    FSDP2 and tensor parallel make parameters DTensors (the wrapper serves
    FSDP2's through :mod:`mas_kernels.fsdp`). Both would otherwise fail later
    with errors that do not say why.
    """
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if fsdp1 is not None:
        for mname, m in module.named_modules():
            if isinstance(m, fsdp1):
                where = f"module {mname!r}" if mname else "the model"
                raise NotImplementedError(
                    f"{who}: {where} is a FullyShardedDataParallel (FSDP1) wrapper, "
                    f"whose flat sharded parameters are not the model's; {_SHARDED_HELP}"
                )
    if dtensors:
        reject_dtensors(named, who)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t.to_local()`` for a DTensor (this rank's shard, sharing its storage; differentiable), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The part of ``full`` (a tensor of ``like``'s global shape) that DTensor ``like`` holds on this rank.

    Computed locally, with no communication (every rank has ``full``). For a
    plain tensor ``like`` this is ``full`` itself. The result has ``full``'s
    dtype, on ``like``'s device.
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"local_shard: tensor of shape {tuple(full.shape)} for a parameter of shape "
                         f"{tuple(like.shape)}")
    if not is_dtensor(like):
        return full.to(like.device)
    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import distribute_tensor  # type: ignore[no-redef]
    full = full.detach().to(like.to_local().device)
    try:
        # src_data_rank=None: each rank slices its own copy instead of receiving it from rank 0.
        return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()
    except TypeError:  # older torch: no src_data_rank; scatters from rank 0 (same values, every rank must call)
        return distribute_tensor(full, like.device_mesh, like.placements).to_local()

