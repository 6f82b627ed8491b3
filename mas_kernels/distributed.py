"""torch.distributed support: importance over all ranks, as one process over all the data.

Each rank accumulates importance numerators (sums over its own samples) and
its sample count; ``consolidate()`` all-reduces both (one collective per flat
buffer plus one for the count), so every rank divides the same total by the
same N. Estimation itself never communicates, so ranks may see different
numbers of batches; the penalty is elementwise on each replica.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .state import FlatBuffers


def active(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def is_main_process(group=None) -> bool:
    return not active(group) or dist.get_rank(group) == 0


def barrier(group=None) -> None:
    if active(group):
        dist.barrier(group=group)


def _count_device(group) -> torch.device:
    # NCCL only moves CUDA tensors; gloo and others take CPU ones.
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_importance(acc: FlatBuffers, num_samples: int, group=None) -> int:
    """Sum the accumulators and sample counts over ranks in place; return the total N."""
    if not active(group):
        return int(num_samples)
    count = torch.tensor([float(num_samples)], dtype=torch.float64, device=_count_device(group))
    dist.all_reduce(count, group=group)
    for buf in acc.buffers.values():
        dist.all_reduce(buf, group=group)
    return int(count.item())
