// layer_norm_sums: per sample of a LayerNorm's (RMSNorm's) input x (N, T, D) and output gradient d, sum_t d *
// x_hat and sum_t d over its T rows, x_hat = (x - mean) / sqrt(var + eps) per row (RMSNorm: x / sqrt(mean(x^2)
// + eps)), as (N, 2, D) float32; the statistics in double, as the layer computes them in float32 or better.
//
// channel_sums: per sample and channel of a BatchNorm's input x (N, C, L) and output gradient d (N, C, L),
// sum_l d * (x - mean_c) and sum_l d, in one pass, as (N, C, 2) float32.
//
// The exact rule's BatchNorm (running statistics) needs per sample k
// g_w = invstd * sum_l d_kl (x_kl - mean) and g_b = sum_l d_kl; the PyTorch
// path forms x_hat, d * x_hat and two sums (five passes over (N, C, L) and
// three temporaries of its size), this reads x and d once.
#include "ops.h"

#include "multi_tensor.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>

namespace mas_kernels {

namespace {

// float lanes (the simd reduction), then their sum: ~1e-7 * sqrt(n) relative, vectorised (a double
// accumulator measured 8x slower, unvectorised).
template <typename T>
MAS_KERNELS_INLINE void row_sums(const T* __restrict x, const T* __restrict d, int64_t n, float mean, float* out) {
  float sx = 0.0f, sd = 0.0f;
#pragma omp simd reduction(+ : sx, sd)
  for (int64_t i = 0; i < n; ++i) {
    const float dv = load_f32(d[i]);
    sx += dv * (load_f32(x[i]) - mean);
    sd += dv;
  }
  out[0] = sx;
  out[1] = sd;
}

MAS_KERNELS_CLONES void row_sums_of(const float* x, const float* d, int64_t n, float mean, float* out) {
  row_sums(x, d, n, mean, out);
}
MAS_KERNELS_CLONES void row_sums_of(const at::BFloat16* x, const at::BFloat16* d, int64_t n, float mean, float* out) {
  row_sums(x, d, n, mean, out);
}
MAS_KERNELS_CLONES void row_sums_of(const at::Half* x, const at::Half* d, int64_t n, float mean, float* out) {
  row_sums(x, d, n, mean, out);
}

// The row statistics in double lanes (vectorised: the scalar double loop was most of the kernel's time), then
// per row x_hat and the two sums in float, vectorised.
template <typename T>
MAS_KERNELS_INLINE void layer_norm_rows(const T* __restrict x, const T* __restrict d, int64_t rows, int64_t D,
                                        double eps, bool rms, float* __restrict out_w, float* __restrict out_b) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* __restrict xr = x + r * D;
    const T* __restrict dr = d + r * D;
    double sum = 0.0, sq = 0.0;
#pragma omp simd reduction(+ : sum, sq)
    for (int64_t i = 0; i < D; ++i) {
      const double v = load_f32(xr[i]);
      sum += v;
      sq += v * v;
    }
    const double mean = rms ? 0.0 : sum / D;
    const double var = rms ? sq / D : std::max(0.0, sq / D - mean * mean);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + eps)), m = static_cast<float>(mean);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) {
      const float dv = load_f32(dr[i]);
      out_w[i] += dv * ((load_f32(xr[i]) - m) * rstd);
      out_b[i] += dv;
    }
  }
}

MAS_KERNELS_CLONES void layer_norm_rows_of(const float* x, const float* d, int64_t rows, int64_t D, double eps,
                                           bool rms, float* out_w, float* out_b) {
  layer_norm_rows(x, d, rows, D, eps, rms, out_w, out_b);
}
MAS_KERNELS_CLONES void layer_norm_rows_of(const at::BFloat16* x, const at::BFloat16* d, int64_t rows, int64_t D,
                                           double eps, bool rms, float* out_w, float* out_b) {
  layer_norm_rows(x, d, rows, D, eps, rms, out_w, out_b);
}
MAS_KERNELS_CLONES void layer_norm_rows_of(const at::Half* x, const at::Half* d, int64_t rows, int64_t D, double eps,
                                           bool rms, float* out_w, float* out_b) {
  layer_norm_rows(x, d, rows, D, eps, rms, out_w, out_b);
}

}  // namespace

at::Tensor layer_norm_sums(const at::Tensor& x, const at::Tensor& d, double eps, bool rms) {
  const char* op = "mas_kernels layer_norm_sums";
  TORCH_CHECK(x.device().is_cpu() && d.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && d.sizes() == x.sizes() && x.is_contiguous() && d.is_contiguous() &&
                  x.scalar_type() == d.scalar_type(),
              op, ": expected contiguous x and d of one shape (N, T, D) and dtype, got ", x.sizes(), " and ", d.sizes());
  const int64_t N = x.size(0), T = x.size(1), D = x.size(2);
  at::Tensor out = at::zeros({N, 2, D}, x.options().dtype(at::kFloat));
  float* const po = out.data_ptr<float>();
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    const T_* const px = x.const_data_ptr<T_>();
    const T_* const pd = d.const_data_ptr<T_>();
    at::parallel_for(0, N, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s)
        layer_norm_rows_of(px + s * T * D, pd + s * T * D, T, D, eps, rms, po + s * 2 * D, po + s * 2 * D + D);
    });
  };
  on_16_or_32_bit(x, op, run);
  return out;
}

at::Tensor channel_sums(const at::Tensor& x, const at::Tensor& d, const at::Tensor& mean) {
  const char* op = "mas_kernels channel_sums";
  TORCH_CHECK(x.device().is_cpu() && d.device().is_cpu() && mean.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && d.sizes() == x.sizes() && x.is_contiguous() && d.is_contiguous() &&
                  x.scalar_type() == d.scalar_type(),
              op, ": expected contiguous x and d of one shape (N, C, L) and dtype, got ", x.sizes(), " and ", d.sizes());
  TORCH_CHECK(mean.dim() == 1 && mean.size(0) == x.size(1) && mean.scalar_type() == at::kFloat && mean.is_contiguous(),
              op, ": mean must be a contiguous float32 (C,) tensor");
  const int64_t N = x.size(0), C = x.size(1), L = x.size(2);
  at::Tensor out = at::empty({N, C, 2}, x.options().dtype(at::kFloat));
  float* const po = out.data_ptr<float>();
  const float* const pm = mean.const_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(L, 1));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* const px = x.const_data_ptr<T>();
    const T* const pd = d.const_data_ptr<T>();
    at::parallel_for(0, N * C, grain, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) row_sums_of(px + r * L, pd + r * L, L, pm[r % C], po + 2 * r);
    });
  };
  on_16_or_32_bit(x, op, run);
  return out;
}

}  // namespace mas_kernels
