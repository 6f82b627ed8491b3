"""Triton kernel for ``abs_outer_accumulate_`` (imported lazily: see ``_backend``).

A tiled matmul ``|a|^T @ |b|`` whose epilogue adds into ``omega``. Each program
owns one (BLOCK_J, BLOCK_I) tile of ``omega``, so no atomics are needed and the
result is deterministic. ``a`` is read through its strides as a (N, J) matrix
and transposed in registers, so transposed or strided views cost no copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend


def _configs():
    return [
        triton.Config({"BLOCK_J": bj, "BLOCK_I": bi, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for (bj, bi, bn, w, s) in [
            (64, 64, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (128, 128, 64, 8, 3),
            (128, 256, 64, 8, 3),
        ]
    ]


@triton.autotune(
    configs=_backend.autotune_configs(_configs()),
    key=["J", "I", "UPCAST"],
    # Autotuning runs the kernel several times: restore omega so it is added once.
    restore_value=["omega_ptr"],
)
@triton.jit
def _abs_outer_fwd_kernel(
    omega_ptr, a_ptr, b_ptr,
    N, J, I,
    stride_oj, stride_oi,
    stride_an, stride_aj,
    stride_bn, stride_bi,
    alpha,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_j = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_j = rj < J
    mask_i = ri < I

    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        # int64 row indices: N * stride can exceed 2**31 on large activations.
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_n = rn < N
        a = tl.load(a_ptr + rn[:, None] * stride_an + rj[None, :] * stride_aj,
                    mask=mask_n[:, None] & mask_j[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + ri[None, :] * stride_bi,
                    mask=mask_n[:, None] & mask_i[None, :], other=0.0)
        if UPCAST:
            # fp32 math: mixed input dtypes, and the interpreter's bf16 arithmetic
            # is only right after a cast to fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # abs is exact in any dtype, so 16-bit inputs keep the tensor-core path.
        acc = tl.dot(tl.trans(tl.abs(a)), tl.abs(b), acc, input_precision=PRECISION)

    omega_ptrs = omega_ptr + rj[:, None] * stride_oj + ri[None, :] * stride_oi
    mask = mask_j[:, None] & mask_i[None, :]
    omega = tl.load(omega_ptrs, mask=mask, other=0.0)
    tl.store(omega_ptrs, omega + alpha * acc, mask=mask)


def abs_outer_triton(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    N, J = a.shape
    I = b.shape[1]
    upcast = a.dtype != b.dtype or a.dtype == torch.float32 or _backend.interpreting()
    # fp32 inputs: exact products unless the user allowed TF32 for matmuls, as torch.mm does.
    precision = "tf32" if (a.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if _backend.interpreting():
        precision = "ieee"

    def grid(meta):
        return (triton.cdiv(J, meta["BLOCK_J"]), triton.cdiv(I, meta["BLOCK_I"]))

    _abs_outer_fwd_kernel[grid](
        omega, a, b,
        N, J, I,
        omega.stride(0), omega.stride(1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        float(alpha),
        UPCAST=upcast,
        PRECISION=precision,
    )
