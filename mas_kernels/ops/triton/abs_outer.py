"""Triton kernel for ``abs_outer_accumulate_`` (imported lazily: see ``_backend``).

A tiled matmul ``|a|^T @ |b|`` whose epilogue adds into ``omega``. Each program
owns one (BLOCK_J, BLOCK_I) tile of ``omega``, so no atomics are needed and the
result is deterministic. ``a`` and ``b`` are read through their strides (a's
tile directly as its transpose), so transposed or strided views cost no copy.

Precision: one rule from the pair of input dtypes, whatever their order
(:func:`precision`). ``abs`` is exact in every dtype, and fp32 holds the
product of two fp16 or two bf16 values exactly, so:

* f16 x f16, bf16 x bf16: tensor cores in the input dtype, fp32 accumulation:
  every product exact.
* f16 x bf16: both are exactly representable in TF32 (10-bit mantissa, fp32
  exponent range), so both are converted to fp32 and multiplied as TF32 on
  tensor cores: again every product exact.
* any fp32 input: fp32 FMA (``ieee``: every product exact), unless the user
  allowed TF32 for matmuls (``torch.backends.cuda.matmul.allow_tf32``, as
  ``torch.mm`` reads it): then TF32 tensor cores, whose products round the
  fp32 operands to 10 mantissa bits (relative error up to 2**-11 per operand).

Each rule has its own autotune configs, sized from the compile audit
(``python -m mas_kernels.audit``, figures in ``docs/kernels.md``): no config
spills registers or needs more shared memory than an A100 (sm_80) has.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import _backend

# (BLOCK_J, BLOCK_I, BLOCK_N, num_warps, num_stages) per precision rule.
CONFIGS = {
    # fp16/bf16 tensor cores: 16-bit tiles in shared memory.
    "f16": [
        (64, 64, 32, 4, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (128, 128, 64, 8, 3),
    ],
    # TF32 tensor cores: fp32 tiles, twice the shared memory per element.
    "tf32": [
        (64, 64, 32, 8, 3),
        (128, 128, 32, 8, 3),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
    ],
    # fp32 FMA: every product exact; no tensor cores, so the tile is bounded by
    # the registers of the accumulator and operand fragments (62-242 per thread).
    # (128x64x32 with 8 warps spilled 28 bytes on triton 3.6 for one odd shape.)
    "ieee": [
        (64, 64, 32, 8, 3),
        (64, 128, 32, 8, 3),
        (128, 128, 16, 8, 3),
        (128, 128, 32, 8, 2),
    ],
}
CONFIGS["bf16"] = CONFIGS["f16"]


def _configs(rule):
    return [
        triton.Config({"BLOCK_J": bj, "BLOCK_I": bi, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for (bj, bi, bn, w, s) in CONFIGS[rule]
    ]


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
    """``omega[tile] += alpha * sum_n |a[n, j]| |b[n, i]|`` for this program's (BLOCK_J, BLOCK_I) tile."""
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
        # a's tile is loaded already transposed, (BLOCK_J, BLOCK_N), rather than
        # loaded (BLOCK_N, BLOCK_J) and put through tl.trans: with tl.trans the
        # compiler copies a J-contiguous fp32 tile 4 bytes at a time for TF32,
        # and the fp32 FMA path needs 2-3x the registers (audit figures in docs/kernels.md).
        a = tl.load(a_ptr + rj[:, None] * stride_aj + rn[None, :] * stride_an,
                    mask=mask_j[:, None] & mask_n[None, :], other=0.0)
        b = tl.load(b_ptr + rn[:, None] * stride_bn + ri[None, :] * stride_bi,
                    mask=mask_n[:, None] & mask_i[None, :], other=0.0)
        if UPCAST:
            # fp32 operands: an fp32 input, a mixed pair (tl.dot takes one dtype),
            # and the interpreter, whose bf16 arithmetic is only right in fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        # abs is exact in any dtype, so 16-bit inputs keep the tensor-core path.
        acc = tl.dot(tl.abs(a), tl.abs(b), acc, input_precision=PRECISION)

    omega_ptrs = omega_ptr + rj[:, None] * stride_oj + ri[None, :] * stride_oi
    mask = mask_j[:, None] & mask_i[None, :]
    omega = tl.load(omega_ptrs, mask=mask, other=0.0)
    tl.store(omega_ptrs, omega + alpha * acc, mask=mask)


def _autotuned(rule):
    return triton.autotune(
        configs=_backend.autotune_configs(_configs(rule)),
        key=["J", "I", "UPCAST", "PRECISION"],
        # Autotuning runs the kernel several times: restore omega so it is added once.
        restore_value=["omega_ptr"],
    )(_abs_outer_fwd_kernel)


# One autotuner per precision rule: each has the configs that fit its operand sizes.
_KERNELS = {rule: _autotuned(rule) for rule in CONFIGS}


def precision(a_dtype: torch.dtype, b_dtype: torch.dtype, allow_tf32: bool) -> str:
    """The precision rule for an input pair (symmetric): ``"f16"``, ``"bf16"``, ``"tf32"`` or ``"ieee"``."""
    pair = {a_dtype, b_dtype}
    if pair == {torch.float16}:
        return "f16"
    if pair == {torch.bfloat16}:
        return "bf16"
    if torch.float32 in pair:
        return "tf32" if allow_tf32 else "ieee"
    return "tf32"  # f16 x bf16: exact in TF32


def abs_outer_triton(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    if torch.float64 in (omega.dtype, a.dtype, b.dtype):  # the PyTorch path (see the package docstring)
        from ..abs_outer import abs_outer_torch

        abs_outer_torch(omega, a, b, alpha)
        return
    rule = precision(a.dtype, b.dtype, torch.backends.cuda.matmul.allow_tf32)
    if a.stride(0) == 1 and a.shape[1] > 1 and not (b.stride(0) == 1 and b.shape[1] > 1):
        # a is contiguous along N (a transposed view): compute omega^T += |b|^T |a|,
        # which puts it in b's place. In a's place an N-contiguous 16-bit tile
        # converted for TF32 is copied 8 bytes at a time on sm_90; in b's place, 16.
        omega, a, b = omega.t(), b, a
    N, J = a.shape
    I = b.shape[1]
    if _backend.interpreting():
        rule = "ieee"  # the interpreter: fp32 operands (its bf16 math is wrong), exact products
    upcast = rule in ("tf32", "ieee")

    def grid(meta):
        return (triton.cdiv(J, meta["BLOCK_J"]), triton.cdiv(I, meta["BLOCK_I"]))

    _KERNELS[rule][grid](
        omega, a, b,
        N, J, I,
        omega.stride(0), omega.stride(1),
        a.stride(0), a.stride(1),
        b.stride(0), b.stride(1),
        float(alpha),
        UPCAST=upcast,
        PRECISION="tf32" if rule == "tf32" else "ieee",
    )
