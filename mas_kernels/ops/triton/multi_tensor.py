"""Triton kernels over many tensors at once: ``abs_accumulate_`` and ``penalty_grad_``.

Both are elementwise over lists of tensors, so both use the address tables of
``_table``: one launch per group of tensors that share dtypes (a pointer's
element type is a compile-time property), one more per repeat of an output
tensor, and one more when some tensor of the group is a view whose data
pointer is not 16-byte aligned, whatever the number of tensors. Outputs that
are not contiguous are computed in a contiguous scratch copy and copied back;
inputs that are not contiguous are read from a copy. Imported lazily (see
``_backend``).

Machine code (``python -m mas_kernels.audit``; figures in ``docs/kernels.md``):
a program owns ``BLOCK`` consecutive elements of one tensor. When every base
pointer of the launch is 16-byte aligned (``ALIGNED``, checked on the host) a
full chunk is read and written with unmasked 128-bit accesses: the table
cannot tell the compiler that the pointers it holds are aligned or that
``start`` is a multiple of ``BLOCK``, so the kernel says so
(``tl.multiple_of``), and only each tensor's last, partial chunk takes the
masked path, which the compiler cannot vectorize (its bound ``n`` is read
from the table).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._table import dense, launch_groups, split_aligned, table

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Elements per program. Large enough that the per-program table lookups are
# negligible, small enough that a 161-tensor ResNet list fills a GPU. With 8
# warps a thread holds 8 elements: two 128-bit accesses per fp32 tensor, one
# per 16-bit tensor.
_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _chunk_ptr(ptrs, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The base pointer of tensor ``t`` from the table, with its alignment when the host checked it."""
    ptr = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _chunk_start(blk_start, pid, BLOCK: tl.constexpr):
    # Chunks start at multiples of BLOCK (see _table): with the aligned base
    # pointers this is what lets a full chunk be moved in 128-bit accesses.
    return tl.multiple_of(tl.load(blk_start + pid), BLOCK)


@triton.jit
def _abs_accumulate_chunk(o_ptr, x_ptr, offs, n, alpha, MASKED: tl.constexpr):
    # fp32 right after the load: 16-bit math is wrong under the interpreter.
    if MASKED:
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        tl.store(o_ptr + offs, o + alpha * tl.abs(x), mask=mask)
    else:
        x = tl.load(x_ptr + offs).to(tl.float32)
        o = tl.load(o_ptr + offs)
        tl.store(o_ptr + offs, o + alpha * tl.abs(x))


@triton.jit
def _abs_accumulate_kernel(
    omega_ptrs, t_ptrs, numels, blk_tensor, blk_start,
    alpha,
    T_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``omega_t[start:start+BLOCK] += alpha * |x_t[start:start+BLOCK]|`` for this program's chunk."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_tensor + pid)
    start = _chunk_start(blk_start, pid, BLOCK)
    n = tl.load(numels + t)
    o_ptr = _chunk_ptr(omega_ptrs, t, tl.float32, ALIGNED)
    x_ptr = _chunk_ptr(t_ptrs, t, T_DTYPE, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        if start + BLOCK <= n:
            _abs_accumulate_chunk(o_ptr, x_ptr, offs, n, alpha, False)
        else:
            _abs_accumulate_chunk(o_ptr, x_ptr, offs, n, alpha, True)
    else:
        _abs_accumulate_chunk(o_ptr, x_ptr, offs, n, alpha, True)


@triton.jit
def _penalty_grad_chunk(p_ptr, a_ptr, o_ptr, g_ptr, offs, n, two_lam, G_DTYPE: tl.constexpr, MASKED: tl.constexpr):
    """grad += two_lam * o * (p - a) on the chunk; returns sum o * (p - a)^2 over it."""
    # One pass: read theta, theta*, Omega, grad; write grad. Masked lanes read
    # zeros, so they add nothing to the partial sum.
    if MASKED:
        mask = offs < n
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + offs, mask=mask, other=0.0)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = p - a
        od = o * d
        tl.store(g_ptr + offs, (g + two_lam * od).to(G_DTYPE), mask=mask)
    else:
        p = tl.load(p_ptr + offs).to(tl.float32)
        a = tl.load(a_ptr + offs).to(tl.float32)
        o = tl.load(o_ptr + offs)
        g = tl.load(g_ptr + offs).to(tl.float32)
        d = p - a
        od = o * d
        tl.store(g_ptr + offs, (g + two_lam * od).to(G_DTYPE))
    return tl.sum(od * d, axis=0)


@triton.jit
def _penalty_grad_kernel(
    p_ptrs, a_ptrs, o_ptrs, g_ptrs, numels, blk_tensor, blk_start,
    partial_ptr,
    two_lam,
    P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``g += two_lam * o * (p - a)`` on this program's chunk; ``partial[pid] = sum o * (p - a)^2`` over it."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_tensor + pid)
    start = _chunk_start(blk_start, pid, BLOCK)
    n = tl.load(numels + t)
    p_ptr = _chunk_ptr(p_ptrs, t, P_DTYPE, ALIGNED)
    a_ptr = _chunk_ptr(a_ptrs, t, A_DTYPE, ALIGNED)
    o_ptr = _chunk_ptr(o_ptrs, t, tl.float32, ALIGNED)
    g_ptr = _chunk_ptr(g_ptrs, t, G_DTYPE, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        if start + BLOCK <= n:
            s = _penalty_grad_chunk(p_ptr, a_ptr, o_ptr, g_ptr, offs, n, two_lam, G_DTYPE, False)
        else:
            s = _penalty_grad_chunk(p_ptr, a_ptr, o_ptr, g_ptr, offs, n, two_lam, G_DTYPE, True)
    else:
        s = _penalty_grad_chunk(p_ptr, a_ptr, o_ptr, g_ptr, offs, n, two_lam, G_DTYPE, True)
    # One partial per program, summed afterwards: deterministic, no atomics.
    tl.store(partial_ptr + pid, s)


def _scratch(ts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Contiguous stand-ins for output tensors, and the indices that need a copy back."""
    out, back = [], []
    for i, t in enumerate(ts):
        if t.is_contiguous():
            out.append(t)
        else:
            out.append(t.contiguous())
            back.append(i)
    return out, back


def _has_float64(*lists) -> bool:
    return any(t.dtype is torch.float64 for ts in lists for t in ts)


def abs_accumulate_triton(omegas: list[torch.Tensor], tensors: list[torch.Tensor], alpha: float) -> None:
    if _has_float64(omegas, tensors):  # float64: the PyTorch path (see the package docstring)
        from ..abs_accumulate import abs_accumulate_torch

        abs_accumulate_torch(omegas, tensors, alpha)
        return
    for (_, t_dtype), idx in launch_groups(omegas, tensors, out=0):
        outs, back = _scratch([omegas[i] for i in idx])
        ins = [dense(tensors[i]) for i in idx]
        device = outs[0].device
        for aligned, part in split_aligned([outs, ins], list(range(len(idx)))):
            tab = table([[outs[k] for k in part], [ins[k] for k in part]], _BLOCK, device)
            _abs_accumulate_kernel[(tab.n_blocks,)](
                tab.ptrs[0], tab.ptrs[1], tab.numels, tab.blk_tensor, tab.blk_start,
                float(alpha),
                T_DTYPE=_TL_DTYPE[t_dtype], BLOCK=_BLOCK, ALIGNED=aligned, num_warps=_NUM_WARPS,
            )
        for j in back:
            omegas[idx[j]].copy_(outs[j])


def penalty_grad_triton(params, anchors, omegas, lam: float, grads) -> torch.Tensor:
    device = params[0].device
    partial_sums = []
    for (p_dtype, a_dtype, _, g_dtype), idx in launch_groups(params, anchors, omegas, grads, out=3):
        gs, back = _scratch([grads[i] for i in idx])
        lists = [[dense(params[i]) for i in idx], [dense(anchors[i]) for i in idx],
                 [dense(omegas[i]) for i in idx], gs]
        for aligned, part in split_aligned(lists, list(range(len(idx)))):
            tab = table([[xs[k] for k in part] for xs in lists], _BLOCK, device)
            partial = tab.scratch()
            _penalty_grad_kernel[(tab.n_blocks,)](
                tab.ptrs[0], tab.ptrs[1], tab.ptrs[2], tab.ptrs[3],
                tab.numels, tab.blk_tensor, tab.blk_start,
                partial,
                2.0 * float(lam),
                P_DTYPE=_TL_DTYPE[p_dtype], A_DTYPE=_TL_DTYPE[a_dtype], G_DTYPE=_TL_DTYPE[g_dtype],
                BLOCK=_BLOCK, ALIGNED=aligned, num_warps=_NUM_WARPS,
            )
            partial_sums.append(partial.sum())
        for j in back:
            grads[idx[j]].copy_(gs[j])
    if not partial_sums:
        return torch.zeros((), dtype=torch.float32, device=device)
    return (torch.stack(partial_sums).sum() if len(partial_sums) > 1 else partial_sums[0]) * lam


