"""Address tables for one-launch-per-dtype-group kernels over many tensors.

The apex / ATen ``multi_tensor_apply`` idea in Triton: one int64 tensor holds,
for T tensors and B blocks,

    [ptrs of list 0 (T) | ptrs of list 1 (T) | ... | numels (T) | block->tensor (B) | block->start (B)]

and program ``pid`` processes elements ``[start, start + BLOCK)`` of tensor
``block->tensor[pid]``. Building it costs one small host->device copy; tables
are cached by (pointers, sizes, device), which repeat on every training step.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_CACHE: "OrderedDict[tuple, tuple]" = OrderedDict()
_CACHE_SIZE = 64


def build_table(lists: list[list[torch.Tensor]], block: int, device: torch.device):
    """Return ``(table, n_blocks, views)`` where ``views`` are the named slices of ``table``."""
    numels = [t.numel() for t in lists[0]]
    key = (tuple(tuple(t.data_ptr() for t in xs) for xs in lists), tuple(numels), block, str(device))
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    n_tensors = len(numels)
    sizes = torch.tensor(numels, dtype=torch.int64)
    blocks = (sizes + block - 1) // block
    n_blocks = int(blocks.sum())
    blk_tensor = torch.repeat_interleave(torch.arange(n_tensors, dtype=torch.int64), blocks)
    first_block = torch.cumsum(blocks, 0) - blocks
    blk_start = (torch.arange(n_blocks, dtype=torch.int64) - first_block[blk_tensor]) * block
    ptrs = torch.tensor([[t.data_ptr() for t in xs] for xs in lists], dtype=torch.int64).reshape(-1)
    table = torch.cat([ptrs, sizes, blk_tensor, blk_start]).to(device)
    n_lists = len(lists)
    views = {
        "ptrs": [table[i * n_tensors:(i + 1) * n_tensors] for i in range(n_lists)],
        "numels": table[n_lists * n_tensors:(n_lists + 1) * n_tensors],
        "blk_tensor": table[(n_lists + 1) * n_tensors:(n_lists + 1) * n_tensors + n_blocks],
        "blk_start": table[(n_lists + 1) * n_tensors + n_blocks:],
    }
    result = (table, n_blocks, views)
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def launch_groups(*lists: list[torch.Tensor], out: int) -> list[tuple[tuple, list[int]]]:
    """Indices of the tensors to process together, one launch per entry.

    Tensors are grouped by the tuple of dtypes across ``lists`` (a pointer's
    element type is fixed at compile time); empty tensors are skipped. A
    group is further split into rounds in which no output tensor
    (``lists[out]``) appears twice, so a repeated output is updated once per
    appearance, as in the eager path, instead of racing with itself.
    """
    groups: dict[tuple, list[list[int]]] = {}
    seen: dict[tuple, list[set]] = {}
    for i in range(len(lists[0])):
        if lists[0][i].numel() == 0:
            continue
        key = tuple(xs[i].dtype for xs in lists)
        rounds, ptrs = groups.setdefault(key, []), seen.setdefault(key, [])
        ptr = lists[out][i].data_ptr()
        for r, used in zip(rounds, ptrs):
            if ptr not in used:
                r.append(i)
                used.add(ptr)
                break
        else:
            rounds.append([i])
            ptrs.append({ptr})
    return [(key, r) for key, rounds in groups.items() for r in rounds]


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if contiguous, else a contiguous copy (read-only inputs)."""
    return t if t.is_contiguous() else t.contiguous()
