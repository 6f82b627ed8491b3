// penalty_grad_: value = lam * sum_i sum Omega_i (p_i - a_i)^2, and
// grad_i += 2 lam Omega_i (p_i - a_i), in one pass over memory.
//
// Per element the pass reads p, a, Omega, grad and writes grad (20 bytes in
// fp32), the minimum; eager PyTorch needs ~4 passes for the same result.
#include "ops.h"

#include "float64.h"
#include "guard.h"
#include "multi_tensor.h"

#include <ATen/ops/scalar_tensor.h>

#include <algorithm>

namespace mas_kernels {

namespace {

// Elements [0, n) of one tensor; returns sum Omega d^2 over them. The
// products are fp32 (as in PyTorch) and are summed in double: a long fp32
// running sum of same-signed terms drifts by ~1e-5 relative, and the extra
// cost (a widening add per element) hides under the memory traffic.
template <typename P, typename A, typename G>
MAS_KERNELS_INLINE double penalty_range(const P* __restrict p, const A* __restrict a,
                                        const float* __restrict o, G* __restrict g, int64_t n, float two_lam) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    const float d = load_f32(p[i]) - load_f32(a[i]);
    const float od = o[i] * d;
    acc += static_cast<double>(od * d);
    g[i] = store_as<G>(load_f32(g[i]) + two_lam * od);
  }
  return acc;
}

// n <= kChunk elements of 16-bit Omega as fp32, in a buffer of this thread's
// (a piece of the work list is at most one chunk): 16-bit Omega halves its
// memory, and converting a chunk while it is in cache costs little next to
// the pass itself, with no template per Omega dtype.
template <typename T>
MAS_KERNELS_INLINE const float* to_f32_chunk(const T* __restrict x, int64_t n) {
  thread_local std::vector<float> buf(static_cast<size_t>(kChunk));
  float* __restrict y = buf.data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = load_f32(x[i]);
  return y;
}

MAS_KERNELS_INLINE const float* omega_f32(const at::Tensor& o, int64_t b, int64_t e) {
  switch (o.scalar_type()) {
    case at::kBFloat16:
      return to_f32_chunk(o.const_data_ptr<at::BFloat16>() + b, e - b);
    case at::kHalf:
      return to_f32_chunk(o.const_data_ptr<at::Half>() + b, e - b);
    default:
      return o.const_data_ptr<float>() + b;  // float32: checked before the parallel loop
  }
}

template <typename P, typename A>
MAS_KERNELS_INLINE double dispatch_grad(const Prepared& t, int64_t b, int64_t e, float two_lam) {
  const P* p = t.ins[0].const_data_ptr<P>() + b;
  const A* a = t.ins[1].const_data_ptr<A>() + b;
  const float* o = omega_f32(t.ins[2], b, e);
  switch (t.work.scalar_type()) {
    case at::kFloat:
      return penalty_range(p, a, o, t.work.data_ptr<float>() + b, e - b, two_lam);
    case at::kBFloat16:
      return penalty_range(p, a, o, t.work.data_ptr<at::BFloat16>() + b, e - b, two_lam);
    case at::kHalf:
      return penalty_range(p, a, o, t.work.data_ptr<at::Half>() + b, e - b, two_lam);
    default:
      TORCH_CHECK(false, "mas_kernels penalty_grad_: unsupported grads dtype ", t.work.scalar_type());  // guarded
  }
}

template <typename P>
MAS_KERNELS_INLINE double dispatch_anchor(const Prepared& t, int64_t b, int64_t e, float two_lam) {
  switch (t.ins[1].scalar_type()) {
    case at::kFloat:
      return dispatch_grad<P, float>(t, b, e, two_lam);
    case at::kBFloat16:
      return dispatch_grad<P, at::BFloat16>(t, b, e, two_lam);
    case at::kHalf:
      return dispatch_grad<P, at::Half>(t, b, e, two_lam);
    default:
      TORCH_CHECK(false, "mas_kernels penalty_grad_: unsupported anchors dtype ", t.ins[1].scalar_type());
  }
}

MAS_KERNELS_CLONES double run_chunk(const Prepared& t, int64_t b, int64_t e, float two_lam) {
  switch (t.ins[0].scalar_type()) {
    case at::kFloat:
      return dispatch_anchor<float>(t, b, e, two_lam);
    case at::kBFloat16:
      return dispatch_anchor<at::BFloat16>(t, b, e, two_lam);
    case at::kHalf:
      return dispatch_anchor<at::Half>(t, b, e, two_lam);
    default:
      TORCH_CHECK(false, "mas_kernels penalty_grad_: unsupported params dtype ", t.ins[0].scalar_type());
  }
}

// All of `prepared`, shared by the threads; returns sum Omega d^2. Each chunk's
// partial sum has its own slot and the slots are added in order afterwards,
// so the value does not depend on the thread count.
double run_all(const std::vector<Prepared>& prepared, float two_lam) {
  const WorkList work(prepared);
  std::vector<double> partial(static_cast<size_t>(work.n_chunks), 0.0);
  // The dtypes were checked before: nothing in the loop throws.
  parallel_chunks(work, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      work.for_each_piece(c, [&](int64_t i, int64_t b, int64_t e) { s += run_chunk(prepared[i], b, e, two_lam); });
      partial[c] = s;
    }
  });
  double sum = 0.0;
  for (double v : partial) sum += v;
  return sum;
}

}  // namespace

at::Tensor penalty_grad_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                         const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>& grads) {
  const bool repeated = guard_penalty("penalty_grad_", params, anchors, omegas, lam, &grads);
  const size_t n = params.size();
  if (any_double({&params, &anchors, &omegas, &grads})) return penalty_grad_f64(params, anchors, omegas, lam, grads);
  const float two_lam = static_cast<float>(2.0 * lam);
  double sum = 0.0;
  if (!repeated) {
    std::vector<Prepared> prepared;
    prepared.reserve(n);
    for (size_t i = 0; i < n; ++i) prepared.push_back(prepare(grads[i], {params[i], anchors[i], omegas[i]}));
    sum = run_all(prepared, two_lam);
    finish(prepared);
  } else {
    // A grad listed twice (the guard refuses any other sharing across entries):
    // one entry after another, as the PyTorch path does.
    for (size_t i = 0; i < n; ++i) {
      std::vector<Prepared> one{prepare(grads[i], {params[i], anchors[i], omegas[i]})};
      sum += run_all(one, two_lam);
      finish(one);
    }
  }
  return at::scalar_tensor(static_cast<float>(lam * sum), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace mas_kernels
