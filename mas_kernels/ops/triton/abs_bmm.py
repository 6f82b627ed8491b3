"""Triton kernel for ``abs_bmm_accumulate_`` (imported lazily: see ``_backend``).

``omega += alpha * sum_s |a_s^T b_s|`` with the per-sample products kept in
registers. Each program owns one (BLOCK_J, BLOCK_I) tile of ``omega`` and a
range of samples; it walks (sample, position block) pairs in one flat loop
(so the pipeliner prefetches the next sample's tiles while the current one
finishes, which matters when T fits in one block), accumulates the sample's
``a_s^T b_s`` tile with ``tl.dot`` in fp32, and at the sample's last position
block adds ``|tile|`` into a second register accumulator. Per-sample products
never reach memory; ``omega`` is read and written once per program.

When ``omega`` has too few tiles to fill the GPU, the samples are split over
a third grid axis; each split writes ``alpha * sum`` of its samples into a
(splits, J, I) fp32 buffer (within ``memory_budget``) that is then summed into
``omega`` in split order: deterministic, no atomics.

Precision: the abs is exact in any dtype, so the products are what matters.
Two 16-bit inputs of one dtype go to the tensor cores as they are (fp32
accumulation). Mixed fp16/bf16 pairs are converted to fp32 and multiplied as
TF32, which is exact for them (every fp16 and bf16 value is a TF32 value).
With an fp32 input, the products are IEEE fp32 unless the user allowed TF32
for matmuls (``torch.backends.cuda.matmul.allow_tf32``, as ``torch.mm``
does). The rule depends on the pair of dtypes only, not on their order.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ... import _backend
from .abs_outer import abs_outer_triton

_F32 = 4  # bytes per element of the split buffer


def _configs():
    return [
        triton.Config({"BLOCK_J": bj, "BLOCK_I": bi, "BLOCK_T": bt}, num_warps=w, num_stages=s)
        for (bj, bi, bt, w, s) in [
            (64, 64, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 128, 64, 8, 3),
            (128, 64, 32, 4, 4),
            (64, 128, 32, 4, 4),
            (64, 64, 64, 4, 3),
            (128, 128, 16, 8, 4),
            (64, 64, 16, 4, 4),
        ]
    ]


def _aligned(named_args) -> bool:
    """Whether Triton sees 16-byte aligned inputs, sample and position strides divisible by 16
    and unit inner strides: then every load is a 16-byte access."""
    strides = ("stride_as", "stride_at", "stride_bs", "stride_bt")
    return (all(named_args[n] % 16 == 0 for n in strides)
            and named_args["stride_aj"] == 1 and named_args["stride_bi"] == 1
            and named_args["a_ptr"].data_ptr() % 16 == 0 and named_args["b_ptr"].data_ptr() % 16 == 0)


def _prune(configs, named_args, **kwargs):
    """Drop the configs that spill registers, as ``ptxas -v`` reports them for sm_80 and sm_90.

    From the compile audit of every config without this prune (triton 3.6 and
    3.9, the audit's shapes; ``python -m mas_kernels.audit``, docs/kernels.md):

    * fp32 products on FMA units (an fp32 input, TF32 off): BLOCK_J x BLOCK_T
      over 64 x 32 spills 12-33568 bytes per thread in 70 of 192 compiles;
      with a 16-bit operand next to the fp32 one, BLOCK_I x BLOCK_T over
      64 x 32 too (24-1408 bytes); with ``a`` T-contiguous (the conv rule's
      layout), BLOCK_T over 16 (8-48 bytes).
    * inputs :func:`_aligned` rejects (an odd stride, whose loads are element by
      element, or a T-contiguous ``a``): tiles up to 64 x 64. Over that, fp32
      FMA products spill 48-1408 bytes and TF32 128 x 128 x 64 spills 12-36;
      the other tiles compile clean, but no GPU measurement says they pay for
      their autotuning time there.
    * tensor cores in the input dtype with split samples (no omega read):
      64 x 64 x 32 on 4 warps spills 8 bytes on sm_80 (triton 3.9).

    64 x 64 x 16 spills in no case.
    """
    if _backend.interpreting():
        return configs
    kw = {**named_args, **kwargs}
    aligned = _aligned(kw)
    mixed = kw["a_ptr"].dtype != kw["b_ptr"].dtype

    def keep(c):
        bj, bi, bt = c.kwargs["BLOCK_J"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"]
        if kw["UPCAST"] and kw["PRECISION"] == "ieee":
            if bj * bt > 64 * 32 or (mixed and bi * bt > 64 * 32):
                return False
            if kw["stride_at"] == 1 and kw["stride_aj"] != 1 and bt > 16:
                return False
        if not aligned and (bj > 64 or bi > 64):
            return False
        if not kw["UPCAST"] and not kw["ACCUMULATE"] and (bj, bi, bt, c.num_warps) == (64, 64, 32, 4):
            return False
        return True

    return [c for c in configs if keep(c)] or [c for c in configs if (c.kwargs["BLOCK_J"], c.kwargs["BLOCK_I"],
                                                                      c.kwargs["BLOCK_T"]) == (64, 64, 16)]


@triton.autotune(
    configs=_backend.autotune_configs(_configs()),
    key=["J", "I", "T", "UPCAST", "PRECISION", "ACCUMULATE"],
    prune_configs_by={"early_config_prune": _prune},
    # Autotuning runs the kernel several times: restore omega so it is added once.
    restore_value=["omega_ptr"],
)
@triton.jit
def _abs_bmm_fwd_kernel(
    omega_ptr, a_ptr, b_ptr,
    S, T, J, I, samples_per_split,
    stride_os, stride_oj, stride_oi,
    stride_as, stride_at, stride_aj,
    stride_bs, stride_bt, stride_bi,
    alpha,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr,
):
    pid_j = tl.program_id(0).to(tl.int64)
    pid_i = tl.program_id(1).to(tl.int64)
    pid_s = tl.program_id(2).to(tl.int64)
    rj = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    ri = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_j = rj < J
    mask_i = ri < I
    s_begin = pid_s * samples_per_split
    n_samples = tl.minimum(S - s_begin, samples_per_split).to(tl.int32)
    n_t = tl.cdiv(T, BLOCK_T)

    prod = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)  # this sample's a_s^T b_s so far
    acc = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)   # sum of |a_s^T b_s| over finished samples
    for k in range(0, n_samples * n_t):
        kt = k % n_t
        s = s_begin + k // n_t
        # int64 offsets: sample * stride exceeds 2**31 on large activations.
        rt = kt * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
        mask_t = rt < T
        # a's tile is loaded already transposed, (BLOCK_J, BLOCK_T), rather than loaded
        # (BLOCK_T, BLOCK_J) and put through tl.trans: with tl.trans a J-contiguous fp32
        # tile was copied 4 bytes at a time for TF32 on sm_80, and fp32 FMA products
        # with J = 13 spilled 648 bytes (audit figures in docs/kernels.md).
        a = tl.load(a_ptr + s * stride_as + rj[:, None] * stride_aj + rt[None, :] * stride_at,
                    mask=mask_j[:, None] & mask_t[None, :], other=0.0)
        b = tl.load(b_ptr + s * stride_bs + rt[:, None] * stride_bt + ri[None, :] * stride_bi,
                    mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        if UPCAST:
            # fp32 math: mixed or fp32 inputs, and the interpreter's bf16 arithmetic
            # is only right after a cast to fp32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if PRECISION == "tf32":
            # Through registers: sm_90's wgmma reads TF32 tiles from shared memory only
            # T-contiguous, and a J- or I-contiguous tile copied there straight from
            # global memory is transposed 4 bytes at a time. With an op in registers the
            # compiler stages each tile with 16-byte copies, feeds a to wgmma from
            # registers and writes b T-contiguous from registers (as abs_outer's abs does).
            # x + 0.0 is x but for -0.0, whose sign no product can show after the abs.
            a = a + 0.0
            b = b + 0.0
        prod = tl.dot(a, b, prod, input_precision=PRECISION)
        if kt == n_t - 1:
            # The sample's last positions: its product is complete, take the abs now.
            acc += tl.abs(prod)
            prod = tl.zeros((BLOCK_J, BLOCK_I), dtype=tl.float32)

    out_ptrs = omega_ptr + pid_s * stride_os + rj[:, None] * stride_oj + ri[None, :] * stride_oi
    mask = mask_j[:, None] & mask_i[None, :]
    if ACCUMULATE:
        omega = tl.load(out_ptrs, mask=mask, other=0.0)
        tl.store(out_ptrs, omega + alpha * acc, mask=mask)
    else:
        tl.store(out_ptrs, alpha * acc, mask=mask)


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def splits(S: int, J: int, I: int, memory_budget: int, programs: int) -> int:
    """Sample splits so that about 2 * ``programs`` programs run, counting 128 x 128 tiles of omega.

    Each split beyond one costs a (J, I) fp32 buffer; with the sum over
    splits, ``(splits + 1) * J * I * 4`` bytes must fit ``memory_budget``.
    """
    tiles = triton.cdiv(J, 128) * triton.cdiv(I, 128)
    n = max(1, min(S, (2 * programs) // tiles, memory_budget // (_F32 * J * I) - 1))
    return triton.cdiv(S, triton.cdiv(S, n))  # no empty split


def precision(a_dtype: torch.dtype, b_dtype: torch.dtype) -> tuple[bool, str]:
    """``(upcast, input_precision)`` for the pair of input dtypes (the rule in the module docstring)."""
    if _backend.interpreting():
        return True, "ieee"
    if torch.float32 in (a_dtype, b_dtype):
        return True, "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if a_dtype != b_dtype:
        return True, "tf32"  # exact for fp16 and bf16 values
    return False, "ieee"  # 16-bit tensor-core products; input_precision only applies to fp32


def launch(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, memory_budget: int,
           programs: int | None = None) -> None:
    """The kernel for any T >= 1 (``abs_bmm_triton`` sends T = 1 to ``abs_outer``)."""
    S, T, J = a.shape
    I = b.shape[2]
    if omega.numel() == 0 or S == 0 or T == 0:
        return
    if a.dtype == torch.float32 and b.dtype != torch.float32:
        # a_s^T b_s = (b_s^T a_s)^T: the kernel with its fp32 operand second and omega
        # transposed. Converting the 16-bit b in registers next to an fp32 a that is
        # transposed for tl.dot spilled 0.8-20 KB per thread on sm_80 and sm_90; the other
        # way round spills nothing.
        omega, a, b = omega.t(), b, a
        J, I = I, J
    if programs is None:
        programs = _multiprocessors(a.device.index or 0) if a.is_cuda else 4
    n_split = splits(S, J, I, memory_budget, programs)
    per_split = triton.cdiv(S, n_split)
    upcast, prec = precision(a.dtype, b.dtype)
    out = omega if n_split == 1 else torch.empty((n_split, J, I), dtype=torch.float32, device=omega.device)
    stride_os = 0 if n_split == 1 else out.stride(0)
    stride_oj, stride_oi = (omega.stride(0), omega.stride(1)) if n_split == 1 else (out.stride(1), out.stride(2))

    def grid(meta):
        return (triton.cdiv(J, meta["BLOCK_J"]), triton.cdiv(I, meta["BLOCK_I"]), n_split)

    _abs_bmm_fwd_kernel[grid](
        out, a, b,
        S, T, J, I, per_split,
        stride_os, stride_oj, stride_oi,
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        float(alpha),
        ACCUMULATE=n_split == 1,
        UPCAST=upcast,
        PRECISION=prec,
    )
    if n_split > 1:
        omega.add_(out.sum(0))  # alpha is already in the partial sums


def abs_bmm_triton(omega: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, memory_budget: int) -> None:
    if omega.numel() == 0 or a.shape[0] == 0 or a.shape[1] == 0:
        return
    if torch.float64 in (omega.dtype, a.dtype, b.dtype):  # the PyTorch path (see the package docstring)
        from ..abs_bmm import abs_bmm_torch

        abs_bmm_torch(omega, a, b, alpha, memory_budget)
        return
    if a.shape[1] == 1:
        # |a_s^T b_s| = |a_s|^T |b_s| for one position: the abs-GEMM, which needs no per-sample tile.
        abs_outer_triton(omega, a[:, 0], b[:, 0], alpha)
        return
    launch(omega, a, b, alpha, memory_budget)
