"""Triton kernels of the optimizer steps with the MAS penalty: ``adam_penalty_step_`` and ``sgd_penalty_step_``.

Multi-tensor, like ``multi_tensor.py``: the address tables of ``_table``
(one launch per group of tensors that share dtypes and step count, one more
where some view is not 16-byte aligned), a program per ``BLOCK`` elements of
one tensor, unmasked 128-bit accesses on full chunks when the host found
every base pointer aligned, the masked path for each tensor's last chunk.
Outputs that are not contiguous are updated in a contiguous copy and copied
back; inputs that are not contiguous are read from a copy.

Per element (fp32 arithmetic whatever the storage; stores round once): read
theta, grad, the state, theta*, Omega; write theta and the state. The
penalty gradient ``2 lam Omega (theta - theta*)`` never leaves registers.
Every scalar that changes between steps (``lr``, ``lam``, the bias
corrections of the step count) is a runtime argument: a new value never
recompiles. Only what picks the code path is ``tl.constexpr``: the dtypes,
whether there is a penalty, amsgrad, momentum, nesterov, and SGD's first
step (two compiles at most). ``sqrt`` and ``/`` are IEEE-rounded
(``sqrt_rn``, ``div_rn``), as torch's kernels are, rather than the faster
approximations, so a step matches ``torch.optim`` to a rounding or two.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._steps import by_step
from ._table import dense, launch_groups, split_aligned, table
from .multi_tensor import _TL_DTYPE, _chunk_ptr, _chunk_start, _scratch

# As multi_tensor.py: 8 elements per thread, two 128-bit accesses per fp32 tensor.
# Adam keeps 7 streams of 8 in flight per thread (about 60 registers of data).
_BLOCK = 2048
_NUM_WARPS = 8


@triton.jit
def _load(ptr, offs, mask, MASKED: tl.constexpr):
    # fp32 right after the load: 16-bit math is wrong under the interpreter.
    if MASKED:
        return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + offs).to(tl.float32)


@triton.jit
def _store(ptr, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty))


@triton.jit
def _grad_with_penalty(p, g_ptr, a_ptr, o_ptr, offs, mask, two_lam, grad_sign, PENALTY: tl.constexpr,
                       MASKED: tl.constexpr):
    """(sign * (grad + 2 lam Omega (p - a)), Omega (p - a)^2) for the chunk (zeros for masked lanes)."""
    g = _load(g_ptr, offs, mask, MASKED)
    if PENALTY:
        d = p - _load(a_ptr, offs, mask, MASKED)
        od = _load(o_ptr, offs, mask, MASKED) * d
        g = g + two_lam * od
        sq = od * d
    else:
        sq = tl.zeros_like(g)
    return g * grad_sign, sq


@triton.jit
def _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, o_ptr, offs, n,
                two_lam, grad_sign, decay, wd_coupled, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                PENALTY: tl.constexpr, AMSGRAD: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < n
    p = _load(p_ptr, offs, mask, MASKED)
    g, sq = _grad_with_penalty(p, g_ptr, a_ptr, o_ptr, offs, mask, two_lam, grad_sign, PENALTY, MASKED)
    # Coupled weight decay reads theta before the decoupled one scales it. A decay of 0 touches
    # nothing, as in torch (an inf theta does not become NaN through 0 * inf).
    if wd_coupled != 0.0:
        g = g + wd_coupled * p
    if decay != 1.0:
        p = p * decay
    m = _load(m_ptr, offs, mask, MASKED)
    # torch.lerp's two forms (the one it uses depends on the weight).
    if lerp_w < 0.5:
        m = m + lerp_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - lerp_w)
    v = _load(v_ptr, offs, mask, MASKED)
    v = v * beta2 + one_minus_beta2 * g * g
    _store(m_ptr, offs, m, mask, MASKED)
    _store(v_ptr, offs, v, mask, MASKED)
    if AMSGRAD:
        vmax = tl.maximum(_load(vmax_ptr, offs, mask, MASKED), v)
        _store(vmax_ptr, offs, vmax, mask, MASKED)
        v = vmax
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + neg_step_size * tl.div_rn(m, denom)
    _store(p_ptr, offs, p, mask, MASKED)
    return tl.sum(sq, axis=0)


@triton.jit
def _adam_kernel(
    p_ptrs, g_ptrs, m_ptrs, v_ptrs, vmax_ptrs, a_ptrs, o_ptrs, numels, blk_tensor, blk_start,
    partial_ptr,
    two_lam, grad_sign, decay, wd_coupled, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
    VMAX_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr,
    PENALTY: tl.constexpr, AMSGRAD: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One Adam step with the penalty gradient on this program's chunk; ``partial[pid] = sum Omega d^2``."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_tensor + pid)
    start = _chunk_start(blk_start, pid, BLOCK)
    n = tl.load(numels + t)
    p_ptr = _chunk_ptr(p_ptrs, t, P_DTYPE, ALIGNED)
    g_ptr = _chunk_ptr(g_ptrs, t, G_DTYPE, ALIGNED)
    m_ptr = _chunk_ptr(m_ptrs, t, M_DTYPE, ALIGNED)
    v_ptr = _chunk_ptr(v_ptrs, t, V_DTYPE, ALIGNED)
    vmax_ptr = _chunk_ptr(vmax_ptrs, t, VMAX_DTYPE, ALIGNED)
    a_ptr = _chunk_ptr(a_ptrs, t, A_DTYPE, ALIGNED)
    o_ptr = _chunk_ptr(o_ptrs, t, tl.float32, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        if start + BLOCK <= n:
            s = _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, decay,
                            wd_coupled, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                            PENALTY, AMSGRAD, False)
        else:
            s = _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, decay,
                            wd_coupled, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                            PENALTY, AMSGRAD, True)
    else:
        s = _adam_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, decay,
                        wd_coupled, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                        PENALTY, AMSGRAD, True)
    tl.store(partial_ptr + pid, s)


@triton.jit
def _sgd_chunk(p_ptr, g_ptr, b_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, wd, momentum, one_minus_dampening,
               neg_lr, PENALTY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
               FIRST: tl.constexpr, MASKED: tl.constexpr):
    mask = offs < n
    p = _load(p_ptr, offs, mask, MASKED)
    g, sq = _grad_with_penalty(p, g_ptr, a_ptr, o_ptr, offs, mask, two_lam, grad_sign, PENALTY, MASKED)
    if wd != 0.0:
        g = g + wd * p
    if MOMENTUM:
        if FIRST:
            buf = g  # torch.optim.SGD: the buffer starts as a copy of the first gradient
        else:
            buf = _load(b_ptr, offs, mask, MASKED) * momentum + one_minus_dampening * g
        _store(b_ptr, offs, buf, mask, MASKED)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p + neg_lr * g
    _store(p_ptr, offs, p, mask, MASKED)
    return tl.sum(sq, axis=0)


@triton.jit
def _sgd_kernel(
    p_ptrs, g_ptrs, b_ptrs, a_ptrs, o_ptrs, numels, blk_tensor, blk_start,
    partial_ptr,
    two_lam, grad_sign, wd, momentum, one_minus_dampening, neg_lr,
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, A_DTYPE: tl.constexpr,
    PENALTY: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, FIRST: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    """One SGD step with the penalty gradient on this program's chunk; ``partial[pid] = sum Omega d^2``."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(blk_tensor + pid)
    start = _chunk_start(blk_start, pid, BLOCK)
    n = tl.load(numels + t)
    p_ptr = _chunk_ptr(p_ptrs, t, P_DTYPE, ALIGNED)
    g_ptr = _chunk_ptr(g_ptrs, t, G_DTYPE, ALIGNED)
    b_ptr = _chunk_ptr(b_ptrs, t, B_DTYPE, ALIGNED)
    a_ptr = _chunk_ptr(a_ptrs, t, A_DTYPE, ALIGNED)
    o_ptr = _chunk_ptr(o_ptrs, t, tl.float32, ALIGNED)
    offs = start + tl.arange(0, BLOCK)
    if ALIGNED:
        if start + BLOCK <= n:
            s = _sgd_chunk(p_ptr, g_ptr, b_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, wd, momentum,
                           one_minus_dampening, neg_lr, PENALTY, MOMENTUM, NESTEROV, FIRST, False)
        else:
            s = _sgd_chunk(p_ptr, g_ptr, b_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, wd, momentum,
                           one_minus_dampening, neg_lr, PENALTY, MOMENTUM, NESTEROV, FIRST, True)
    else:
        s = _sgd_chunk(p_ptr, g_ptr, b_ptr, a_ptr, o_ptr, offs, n, two_lam, grad_sign, wd, momentum,
                       one_minus_dampening, neg_lr, PENALTY, MOMENTUM, NESTEROV, FIRST, True)
    tl.store(partial_ptr + pid, s)


# ------------------------------------------------------------------ launchers
def _launch_all(lists: list[list[torch.Tensor]], outs: tuple[int, ...], idx: list[int], launch) -> list[torch.Tensor]:
    """``launch(dtypes, aligned, table, partial)`` for each launch group of ``[xs[i] for i in idx]``.

    ``lists`` in kernel order; ``outs``: the positions of the written lists
    (each updated in a contiguous stand-in when it is not contiguous, copied
    back after). Returns the per-program partial sums.
    """
    sub = [[xs[i] for i in idx] for xs in lists]
    partials = []
    for dtypes, group in launch_groups(*sub, out=outs[0]):
        work, backs = [], []
        for j, xs in enumerate(sub):
            picked = [xs[k] for k in group]
            if j in outs:
                stand_in, back = _scratch(picked)
                work.append(stand_in)
                backs.append((picked, stand_in, back))
            else:
                work.append([dense(t) for t in picked])
        device = work[0][0].device
        for aligned, part in split_aligned(work, list(range(len(group)))):
            tab = table([[xs[k] for k in part] for xs in work], _BLOCK, device)
            partial = tab.scratch()
            launch(dtypes, aligned, tab, partial)
            partials.append(partial.sum())
        for picked, stand_in, back in backs:
            for k in back:
                picked[k].copy_(stand_in[k])
    return partials


def _total(partials: list[torch.Tensor], lam: float, device) -> torch.Tensor:
    if not partials:
        return torch.zeros((), dtype=torch.float32, device=device)
    return (torch.stack(partials).sum() if len(partials) > 1 else partials[0]) * lam


def adam_penalty_step_triton(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, anchors, omegas,
                             lam: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                             decoupled_weight_decay: bool, maximize: bool) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    penalty, amsgrad = bool(anchors), bool(max_exp_avg_sqs)
    # Absent lists stand in as params' (never read: PENALTY / AMSGRAD are off).
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else params,
             anchors if penalty else params, omegas if penalty else params]
    outs = (0, 2, 3, 4) if amsgrad else (0, 2, 3)
    decay = 1.0 - lr * weight_decay if decoupled_weight_decay else 1.0
    wd_coupled = 0.0 if decoupled_weight_decay else weight_decay
    partials = []
    for step, idx in by_step(state_steps).items():
        neg_step_size = -(lr / (1.0 - beta1 ** step))
        bc2_sqrt = (1.0 - beta2 ** step) ** 0.5

        def launch(dtypes, aligned, tab, partial):
            dp, dg, dm, dv, dvmax, da, _ = dtypes
            _adam_kernel[(tab.n_blocks,)](
                *tab.ptrs, tab.numels, tab.blk_tensor, tab.blk_start, partial,
                2.0 * lam, -1.0 if maximize else 1.0, decay, wd_coupled, 1.0 - beta1, beta2, 1.0 - beta2,
                neg_step_size, bc2_sqrt, eps,
                P_DTYPE=_TL_DTYPE[dp], G_DTYPE=_TL_DTYPE[dg], M_DTYPE=_TL_DTYPE[dm], V_DTYPE=_TL_DTYPE[dv],
                VMAX_DTYPE=_TL_DTYPE[dvmax], A_DTYPE=_TL_DTYPE[da], PENALTY=penalty, AMSGRAD=amsgrad,
                BLOCK=_BLOCK, ALIGNED=aligned, num_warps=_NUM_WARPS,
            )

        partials += _launch_all(lists, outs, idx, launch)
    return _total(partials, lam, device)


def sgd_penalty_step_triton(params, grads, momentum_buffers, anchors, omegas, lam: float, lr: float,
                            weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                            first_step: bool) -> torch.Tensor:
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    penalty, has_momentum = bool(anchors), momentum != 0
    lists = [params, grads, momentum_buffers if has_momentum else params,
             anchors if penalty else params, omegas if penalty else params]
    outs = (0, 2) if has_momentum else (0,)

    def launch(dtypes, aligned, tab, partial):
        dp, dg, db, da, _ = dtypes
        _sgd_kernel[(tab.n_blocks,)](
            *tab.ptrs, tab.numels, tab.blk_tensor, tab.blk_start, partial,
            2.0 * lam, -1.0 if maximize else 1.0, weight_decay, momentum, 1.0 - dampening, -lr,
            P_DTYPE=_TL_DTYPE[dp], G_DTYPE=_TL_DTYPE[dg], B_DTYPE=_TL_DTYPE[db], A_DTYPE=_TL_DTYPE[da],
            PENALTY=penalty, MOMENTUM=has_momentum, NESTEROV=bool(nesterov), FIRST=bool(first_step),
            BLOCK=_BLOCK, ALIGNED=aligned, num_warps=_NUM_WARPS,
        )

    return _total(_launch_all(lists, outs, list(range(len(params))), launch), lam, device)
