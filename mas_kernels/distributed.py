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
    The ``MAS`` wrapper does not estimate on sharded parameters. What works:
    estimate on an unsharded replica (one process or DDP), ``save()`` the
    state, then train under FSDP2 with ``mas_kernels.ShardedPenalty``
    (``sharded.py``), which keeps Omega and theta* for this rank's
    local shards only and applies the fused penalty to them. See
    ``docs/distributed.md``.

This module holds collectives and sharding checks only; it imports nothing
from the wrapper.
"""

from __future__ import annotations

import json
import sys
import warnings
import zlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint
from .state import FlatBuffers


# ------------------------------------------------------------------- groups
def active(group=None) -> bool:
    """True when torch.distributed is initialized with more than one rank in ``group``."""
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
def _layout(acc: FlatBuffers) -> int:
    """A checksum of names, shapes and buffer dtypes: equal on ranks that hold the same model."""
    text = json.dumps([[name, list(view.shape), str(view.dtype)] for name, view in acc.items()])
    return zlib.crc32(text.encode())


def all_reduce_importance(acc: FlatBuffers, counts: int | tuple[int, ...], group=None) -> int | tuple[int, ...]:
    """Sum the accumulators and the counts over ranks in place; return the total count(s).

    ``counts``: the sample count N, or a tuple of counts (e.g. samples and
    batches); the same kind comes back. One ``all_gather`` of a few integers
    per rank (the counts, number of buffers, elements, layout checksum)
    checks that every rank tracks the same
    parameters, so a mismatch raises the same clear error on every rank
    instead of hanging in, or silently mis-adding, the buffer all-reduces;
    then one ``all_reduce`` (sum) per flat buffer. Every rank of ``group``
    must call it (``MAS.consolidate()`` does), whatever its number of samples,
    zero included.
    """
    single = not isinstance(counts, tuple)
    counts = (counts,) if single else counts
    if not active(group):
        return int(counts[0]) if single else tuple(int(c) for c in counts)
    device = _comm_device(group)
    numel = sum(b.numel() for b in acc.buffers.values())
    k = len(counts)
    mine = torch.tensor([*map(int, counts), len(acc.buffers), numel, _layout(acc)], dtype=torch.int64,
                        device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    table = torch.stack(every).cpu()
    if not bool((table[:, k:] == table[0, k:]).all()):
        bad = int((table[:, k:] != table[0, k:]).any(dim=1).nonzero()[0, 0])
        raise RuntimeError(
            "MAS.consolidate: ranks track different parameters (rank 0: "
            f"{int(table[0, k])} buffers, {int(table[0, k + 1])} elements; rank {bad}: "
            f"{int(table[bad, k])} buffers, {int(table[bad, k + 1])} elements, or other names/shapes/dtypes); "
            "every rank must wrap the same model with the same MAS options"
        )
    for buf in acc.buffers.values():
        if buf.device.type == "cpu" and device.type == "cuda":  # a CPU-resident parameter under NCCL
            tmp = buf.to(device)
            dist.all_reduce(tmp, group=group)
            buf.copy_(tmp)
        else:
            dist.all_reduce(buf, group=group)
    totals = tuple(int(c) for c in table[:, :k].sum(0))
    return totals[0] if single else totals


def consolidate(state, params: dict, combine, per_batch_mean: bool, session_open: bool, group=None) -> None:
    """``MAS.consolidate()``: the numerators and counts summed over the ranks, folded into Omega
    (divided by N, or by the number of batches for per-batch means), theta* snapshot; the accumulator
    and staging released unless a session is open (its hooks still write into staging)."""
    n, n_batches = all_reduce_importance(state.acc, (state.num_samples, state.num_batches), group)
    if n == 0:
        if not state.num_samples:
            state.release(staging=not session_open)
        raise RuntimeError(
            "MAS.consolidate(): no samples seen since the last consolidate; call estimate() "
            "or run forward passes inside accumulating() first"
        )
    state.fold(n, combine, divisor=n_batches if per_batch_mean else n)
    state.snapshot(params)
    if not session_open:
        state.release()


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


def save_over_ranks(path, sd: dict, meta: dict, group=None) -> None:
    """``MAS.save``: the open accumulator (each rank's own samples) summed over the ranks, as one process
    would hold it, then rank 0 writes while the others wait (its error raised on every rank)."""
    sd["accumulator"], (num_samples, num_batches) = summed_over_ranks(
        sd["accumulator"], (sd["num_samples"], sd["num_batches"]), group)
    parts = {part: sd[part] for part in checkpoint.PARTS}
    meta = {**meta, "num_samples": num_samples, "num_batches": num_batches}
    main_process_only(lambda: checkpoint.write(path, parts, meta, "MAS.save"), group, "MAS.save")


def keep_open_task_on_rank0(state, group=None) -> None:
    """After ``MAS.load``: a file's open accumulator is the sum over the ranks that saved it, so rank 0
    alone keeps it and the next ``consolidate()`` counts those samples once."""
    if not is_main_process(group):
        state.release(staging=False)
        state.num_samples = state.num_batches = 0


def summed_over_ranks(named: dict[str, torch.Tensor], counts: int | tuple[int, ...], group=None
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
    total = all_reduce_importance(flat, counts, group)
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
    "the MAS wrapper needs whole parameters on every rank (single process, DDP). Estimate importance "
    "on an unsharded replica, save() it, and apply the penalty to the local shards of an FSDP2 "
    "(fully_shard) model with mas_kernels.distributed.ShardedPenalty(model, path); see docs/distributed.md"
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


def check_unsharded(module: nn.Module, named: dict[str, torch.Tensor], who: str = "MAS") -> None:
    """Raise ``NotImplementedError`` for sharded models: FSDP1 wrappers or DTensor parameters.

    FSDP1 (``FullyShardedDataParallel``) flattens and shards parameters, so the
    names and shapes MAS would see are not the model's (``..._flat_param``);
    FSDP2 and tensor parallel make parameters DTensors. Both would otherwise
    fail later with errors that do not say why.
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

