"""Triton kernels over many tensors at once: ``abs_accumulate_`` and ``penalty_grad_``.

Both are elementwise over lists of tensors, so both use the address table of
``_table``: one launch per group of tensors that share dtypes (a
pointer's element type is a compile-time property; and one more per repeat
of an output tensor), whatever the number of tensors. Outputs that are not contiguous are computed in a contiguous scratch
copy and copied back; inputs that are not contiguous are read from a copy.
Imported lazily (see ``_backend``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..penalty import with_grads
from ._table import build_table, dense, launch_groups

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# Elements per program. Large enough that the per-program table lookups are
# negligible, small enough that a 161-tensor ResNet list fills a GPU.
_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _abs_accumulate_kernel(
    omega_ptrs, t_ptrs, numels, blk_tensor, blk_start,
    alpha,
    T_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    # Which tensor this program works on, and where in it.
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(numels + t)
    o_ptr = tl.load(omega_ptrs + t).to(tl.pointer_type(tl.float32))
    x_ptr = tl.load(t_ptrs + t).to(tl.pointer_type(T_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    # fp32 right after the load: 16-bit math is wrong under the interpreter.
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0)
    tl.store(o_ptr + offs, o + alpha * tl.abs(x), mask=mask)


@triton.jit
def _penalty_grad_kernel(
    p_ptrs, a_ptrs, o_ptrs, g_ptrs, numels, blk_tensor, blk_start,
    partial_ptr,
    two_lam,
    P_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_tensor + pid)
    start = tl.load(blk_start + pid)
    n = tl.load(numels + t)
    p_ptr = tl.load(p_ptrs + t).to(tl.pointer_type(P_DTYPE))
    a_ptr = tl.load(a_ptrs + t).to(tl.pointer_type(A_DTYPE))
    o_ptr = tl.load(o_ptrs + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(g_ptrs + t).to(tl.pointer_type(G_DTYPE))
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    # One pass: read theta, theta*, Omega, grad; write grad. Masked lanes read
    # zeros, so they add nothing to the partial sum.
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = p - a
    od = o * d
    tl.store(g_ptr + offs, (g + two_lam * od).to(G_DTYPE), mask=mask)
    # One partial per program, summed afterwards: deterministic, no atomics.
    tl.store(partial_ptr + pid, tl.sum(od * d, axis=0))


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


def abs_accumulate_triton(omegas: list[torch.Tensor], tensors: list[torch.Tensor], alpha: float) -> None:
    for (_, t_dtype), idx in launch_groups(omegas, tensors, out=0):
        outs, back = _scratch([omegas[i] for i in idx])
        ins = [dense(tensors[i]) for i in idx]
        device = outs[0].device
        _, n_blocks, v = build_table([outs, ins], _BLOCK, device)
        _abs_accumulate_kernel[(n_blocks,)](
            v["ptrs"][0], v["ptrs"][1], v["numels"], v["blk_tensor"], v["blk_start"],
            float(alpha),
            T_DTYPE=_TL_DTYPE[t_dtype], BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
        for j in back:
            omegas[idx[j]].copy_(outs[j])


def penalty_grad_triton(params, anchors, omegas, lam: float, grads) -> torch.Tensor:
    device = params[0].device
    partial_sums = []
    for (p_dtype, a_dtype, _, g_dtype), idx in launch_groups(params, anchors, omegas, grads, out=3):
        gs, back = _scratch([grads[i] for i in idx])
        ps = [dense(params[i]) for i in idx]
        As = [dense(anchors[i]) for i in idx]
        os_ = [dense(omegas[i]) for i in idx]
        _, n_blocks, v = build_table([ps, As, os_, gs], _BLOCK, device)
        partial = torch.empty(n_blocks, dtype=torch.float32, device=device)
        _penalty_grad_kernel[(n_blocks,)](
            v["ptrs"][0], v["ptrs"][1], v["ptrs"][2], v["ptrs"][3],
            v["numels"], v["blk_tensor"], v["blk_start"],
            partial,
            2.0 * float(lam),
            P_DTYPE=_TL_DTYPE[p_dtype], A_DTYPE=_TL_DTYPE[a_dtype], G_DTYPE=_TL_DTYPE[g_dtype],
            BLOCK=_BLOCK, num_warps=_NUM_WARPS,
        )
        for j in back:
            grads[idx[j]].copy_(gs[j])
        partial_sums.append(partial.sum())
    if not partial_sums:
        return torch.zeros((), dtype=torch.float32, device=device)
    return torch.stack(partial_sums).sum() * lam


penalty_triton = with_grads(penalty_grad_triton)
