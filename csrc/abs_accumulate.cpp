// abs_accumulate_: omega_i += alpha * |t_i| for a list of tensors, one pass
// (read t, read omega, write omega) shared by all threads over all tensors.
#include "ops.h"

#include "float64.h"
#include "guard.h"
#include "multi_tensor.h"

#include <cmath>

namespace mas_kernels {

namespace {

template <typename T>
MAS_KERNELS_INLINE void abs_add_range(const T* __restrict t, float* __restrict o, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) o[i] += alpha * std::fabs(load_f32(t[i]));
}

MAS_KERNELS_CLONES void run_chunk(const Prepared& p, int64_t b, int64_t e, float alpha) {
  float* o = p.work.data_ptr<float>() + b;
  const at::Tensor& t = p.ins[0];
  switch (t.scalar_type()) {
    case at::kFloat:
      abs_add_range(t.const_data_ptr<float>() + b, o, e - b, alpha);
      break;
    case at::kBFloat16:
      abs_add_range(t.const_data_ptr<at::BFloat16>() + b, o, e - b, alpha);
      break;
    case at::kHalf:
      abs_add_range(t.const_data_ptr<at::Half>() + b, o, e - b, alpha);
      break;
    default:
      break;  // rejected before the parallel loop
  }
}

void run_all(const std::vector<Prepared>& prepared, float alpha) {
  const WorkList work(prepared);
  parallel_chunks(work, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      work.for_each_piece(c, [&](int64_t i, int64_t b, int64_t e) { run_chunk(prepared[i], b, e, alpha); });
    }
  });
}

}  // namespace

void abs_accumulate_(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors, double alpha) {
  const bool repeated = guard_abs_accumulate(omegas, tensors, alpha);
  const size_t n = omegas.size();
  if (any_double({&omegas, &tensors})) return abs_accumulate_f64(omegas, tensors, alpha);
  const float a = static_cast<float>(alpha);
  if (!repeated) {
    std::vector<Prepared> prepared;
    prepared.reserve(n);
    for (size_t i = 0; i < n; ++i) prepared.push_back(prepare(omegas[i], {tensors[i]}));
    run_all(prepared, a);
    finish(prepared);
  } else {
    // An omega listed twice: one pair after another, as the PyTorch path does.
    for (size_t i = 0; i < n; ++i) {
      std::vector<Prepared> one{prepare(omegas[i], {tensors[i]})};
      run_all(one, a);
      finish(one);
    }
  }
}

}  // namespace mas_kernels
