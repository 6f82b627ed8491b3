// abs_outer_accumulate_: omega += alpha * |a|^T @ |b| with fp32 accumulation.
//
// Why abs copies + BLAS and not a fused loop: the op is 2*N*J*I flops on
// N*(J+I) inputs, compute-bound for any useful N, and a hand-written CPU GEMM
// would not come close to MKL/OpenBLAS. The abs (with the conversion of
// bf16/fp16 to fp32, so the GEMM accumulates in fp32) is one extra pass over
// the inputs only, O(N*(J+I)) against the GEMM's O(N*J*I): that is what keeps
// the op within a few percent of a plain matmul of the same shape.
#include "ops.h"

#include "float64.h"
#include "guard.h"
#include "multi_tensor.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

namespace mas_kernels {

namespace {

template <typename T>
MAS_KERNELS_INLINE void abs_range(const T* __restrict x, float* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = std::fabs(load_f32(x[i]));
}

// One entry point per dtype: target_clones takes functions, not templates.
MAS_KERNELS_CLONES void abs_range_of(const float* x, float* y, int64_t n) { abs_range(x, y, n); }
MAS_KERNELS_CLONES void abs_range_of(const at::BFloat16* x, float* y, int64_t n) { abs_range(x, y, n); }
MAS_KERNELS_CLONES void abs_range_of(const at::Half* x, float* y, int64_t n) { abs_range(x, y, n); }

template <typename T>
void abs_f32_flat(const T* x, float* y, int64_t n) {
  parallel_chunks((n + kChunk - 1) / kChunk, [&](int64_t c0, int64_t c1) {
    const int64_t b = c0 * kChunk;
    abs_range_of(x + b, y + b, std::min(n, c1 * kChunk) - b);
  });
}

template <typename T>
void abs_f32_strided(const T* x, int64_t s0, int64_t s1, float* __restrict y, int64_t rows, int64_t cols) {
  // Rows per task such that a task has about a chunk of elements.
  const int64_t grain = std::max<int64_t>(1, kGrainChunks * kChunk / std::max<int64_t>(1, cols));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * s0;
      float* yr = y + r * cols;
      for (int64_t c = 0; c < cols; ++c) yr[c] = std::fabs(load_f32(xr[c * s1]));
    }
  });
}

template <typename T>
at::Tensor abs_f32_typed(const at::Tensor& x) {
  const auto f32 = x.options().dtype(at::kFloat);
  if (x.is_non_overlapping_and_dense()) {
    // Same strides as x (e.g. a transposed view stays transposed: BLAS takes
    // either layout without a copy).
    at::Tensor y = at::empty_like(x, f32);
    abs_f32_flat(x.const_data_ptr<T>(), y.data_ptr<float>(), x.numel());
    return y;
  }
  at::Tensor y = at::empty({x.size(0), x.size(1)}, f32);
  abs_f32_strided(x.const_data_ptr<T>(), x.stride(0), x.stride(1), y.data_ptr<float>(), x.size(0), x.size(1));
  return y;
}

// |x| as a new fp32 tensor, one fused pass (abs + convert) over x.
at::Tensor abs_f32(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return abs_f32_typed<float>(x);
    case at::kBFloat16:
      return abs_f32_typed<at::BFloat16>(x);
    case at::kHalf:
      return abs_f32_typed<at::Half>(x);
    default:
      TORCH_CHECK(false, "mas_kernels abs_outer_accumulate_: ", name, " must be float32/bfloat16/float16, got ",
                  x.scalar_type());
  }
}

}  // namespace

void abs_outer_accumulate_(at::Tensor omega, const at::Tensor& a, const at::Tensor& b, double alpha) {
  guard_abs_outer(omega, a, b, alpha);
  TORCH_CHECK(omega.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu(),
              "mas_kernels abs_outer_accumulate_: the native kernels take CPU tensors");
  if (omega.numel() == 0 || a.size(0) == 0) return;
  if (omega.scalar_type() == at::kDouble || a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) {
    abs_outer_f64(omega, a, b, alpha);
    return;
  }
  const at::Tensor abs_a = abs_f32(a, "a");
  const at::Tensor abs_b = abs_f32(b, "b");
  // addmm_ copes with any strides of omega (BLAS directly, or via a copy).
  omega.addmm_(abs_a.t(), abs_b, /*beta=*/1.0, /*alpha=*/alpha);
}

}  // namespace mas_kernels
