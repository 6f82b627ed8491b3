"""Address tables for one-launch-per-dtype-group kernels over many tensors.

The apex / ATen ``multi_tensor_apply`` idea in Triton: one int64 tensor on the
device holds, for L lists of T tensors split into B blocks of ``block``
elements,

    [ptrs of list 0 (T) | ... | ptrs of list L-1 (T) | numels (T) | block->tensor (B) | block->start (B)]

and program ``pid`` processes elements ``[start, start + block)`` of tensor
``block->tensor[pid]``.

A training step calls the penalty with the same lists every time (``mk.MAS``
keeps params, anchors and Omega fixed; only the ``.grad`` tensors may be
reallocated between steps), so a table is kept per *layout*: the tensor sizes,
the number of lists, the block size, the device and the CUDA stream. For a
layout seen before, :func:`table` compares the data pointers with the ones the
table holds (host integers, no device access) and rewrites only the lists whose
pointers changed, with an asynchronous copy from pinned memory, ordered on the
stream like the kernels that read the table. So a warm call makes no host
synchronization, no pageable host->device copy and no allocation; with the
same pointers it copies nothing at all, which is also what lets a step be
captured in a CUDA graph.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

_CACHE_SIZE = 64


class Table:
    """The device table of one layout and the host copy of the pointers it holds."""

    __slots__ = ("data", "n_tensors", "n_blocks", "ptrs", "numels", "blk_tensor", "blk_start", "host_ptrs",
                 "partial", "uploads")

    def __init__(self, numels: tuple[int, ...], n_lists: int, block: int, device: torch.device):
        # Normal tensors even when the first call runs under torch.inference_mode(): an inference
        # tensor could not be updated by the next call of the layout outside it.
        with torch.inference_mode(False):
            self._build(numels, n_lists, block, device)

    def _build(self, numels: tuple[int, ...], n_lists: int, block: int, device: torch.device) -> None:
        n_tensors = len(numels)
        sizes = torch.tensor(numels, dtype=torch.int64)
        blocks = (sizes + block - 1) // block
        counts = [(n + block - 1) // block for n in numels]
        n_blocks = sum(counts)
        blk_tensor = torch.repeat_interleave(torch.arange(n_tensors, dtype=torch.int64), blocks)
        first_block = torch.cumsum(blocks, 0) - blocks
        blk_start = (torch.arange(n_blocks, dtype=torch.int64) - first_block[blk_tensor]) * block
        host = torch.cat([torch.zeros(n_lists * n_tensors, dtype=torch.int64), sizes, blk_tensor, blk_start])
        self.data = _upload(host, device)
        self.n_tensors, self.n_blocks = n_tensors, n_blocks
        t = self.data
        self.ptrs = [t[i * n_tensors:(i + 1) * n_tensors] for i in range(n_lists)]
        self.numels = t[n_lists * n_tensors:(n_lists + 1) * n_tensors]
        self.blk_tensor = t[(n_lists + 1) * n_tensors:(n_lists + 1) * n_tensors + n_blocks]
        self.blk_start = t[(n_lists + 1) * n_tensors + n_blocks:]
        self.host_ptrs: list[list[int] | None] = [None] * n_lists
        self.partial: torch.Tensor | None = None  # a per-block scratch buffer for kernels that need one
        self.uploads = 1  # host->device copies made for this table (tests read it)

    def point_to(self, ptrs: list[list[int]]) -> None:
        """Make the table hold ``ptrs`` (one list of data pointers per tensor list)."""
        for i, (new, held) in enumerate(zip(ptrs, self.host_ptrs)):
            if new != held:
                _upload(torch.tensor(new, dtype=torch.int64), self.data.device, out=self.ptrs[i])
                self.host_ptrs[i] = new
                self.uploads += 1

    def scratch(self, dtype=torch.float32) -> torch.Tensor:
        """A buffer of one element per block, kept with the table (stream-ordered reuse)."""
        if self.partial is None:
            with torch.inference_mode(False):  # see __init__
                self.partial = torch.empty(self.n_blocks, dtype=dtype, device=self.data.device)
        return self.partial


def _upload(host: torch.Tensor, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """``host`` on ``device`` (into ``out`` when given), without a host synchronization.

    On CUDA the copy goes through pinned memory with ``non_blocking=True``: a
    pageable copy would wait for the stream. The caching host allocator keeps
    the pinned block until the copy has run, so it is not reused early.
    """
    if device.type == "cuda":
        host = host.pin_memory()
    if out is None:
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
    out.copy_(host, non_blocking=device.type == "cuda")
    return out


_TABLES: "OrderedDict[tuple, Table]" = OrderedDict()


def _stream_key(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


def table(lists: list[list[torch.Tensor]], block: int, device: torch.device) -> Table:
    """The table for ``lists`` (equal lengths, ``lists[j][i]`` with ``lists[0][i].numel()`` elements)."""
    numels = tuple(t.numel() for t in lists[0])
    key = (numels, len(lists), block, device, _stream_key(device))
    tab = _TABLES.get(key)
    if tab is None:
        tab = _TABLES[key] = Table(numels, len(lists), block, device)
        if len(_TABLES) > _CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    tab.point_to([[t.data_ptr() for t in xs] for xs in lists])
    return tab


def clear() -> None:
    """Forget every table (tests)."""
    _TABLES.clear()


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


def split_aligned(lists: list[list[torch.Tensor]], idx: list[int], align: int = 16) -> list[tuple[bool, list[int]]]:
    """``idx`` split into the tensors whose data pointers in every list are ``align``-byte aligned and the rest.

    The kernels' fast path promises the compiler 16-byte aligned base
    pointers (for 128-bit accesses); a view with a storage offset may not be,
    and goes to the masked, unvectorized path instead.
    """
    good, bad = [], []
    for i in idx:
        (good if all(xs[i].data_ptr() % align == 0 for xs in lists) else bad).append(i)
    return [(flag, part) for flag, part in ((True, good), (False, bad)) if part]


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if contiguous, else a contiguous copy (read-only inputs)."""
    return t if t.is_contiguous() else t.contiguous()
