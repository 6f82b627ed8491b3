// adam_penalty_step_ and sgd_penalty_step_: one torch.optim Adam/AdamW or SGD
// step whose gradient is grad + 2 lam Omega (theta - theta*), the MAS
// penalty's, added in registers: one pass over memory (see
// mas_kernels/ops/optim_step.py for the contract and the formulas).
//
// Per element Adam reads theta, grad, m, v, theta*, Omega and writes theta, m,
// v (36 bytes in fp32); the penalty pass and a fused AdamW step apart move 48.
// Arithmetic is fp32 whatever the storage; stores round once.
#include "ops.h"

#include "multi_tensor.h"

#include <ATen/ops/empty_like.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

namespace mas_kernels {

namespace {

// One tensor of the step, walkable as flat ranges of one layout: its outputs
// (theta, then the optimizer state) and inputs (grad, theta*, Omega).
struct StepTensor {
  std::vector<at::Tensor> outs;  // the caller's
  std::vector<at::Tensor> work;  // the same tensors, or contiguous scratch copies of all of them
  at::Tensor g, a, o;            // in work's layout; a and o undefined without a penalty
  float neg_step_size = 0.f;     // Adam: -lr / (1 - beta1^step), this tensor's own step count
  float bc2_sqrt = 1.f;          // Adam: sqrt(1 - beta2^step)
};

at::Tensor in_layout(const at::Tensor& x, const at::Tensor& like) {
  if (!x.defined() || x.strides() == like.strides()) return x;
  return at::empty_like(like, x.options()).copy_(x);  // empty_like keeps a dense tensor's strides
}

StepTensor prepare_step(std::vector<at::Tensor> outs, const at::Tensor& g, const at::Tensor& a,
                        const at::Tensor& o) {
  StepTensor t;
  bool direct = true;
  for (const auto& x : outs) direct = direct && x.is_non_overlapping_and_dense() && x.strides() == outs[0].strides();
  t.outs = std::move(outs);
  for (const auto& x : t.outs) t.work.push_back(direct ? x : x.contiguous());
  t.g = in_layout(g, t.work[0]);
  t.a = in_layout(a, t.work[0]);
  t.o = in_layout(o, t.work[0]);
  return t;
}

void finish_step(std::vector<StepTensor>& tensors) {
  for (auto& t : tensors) {
    for (size_t k = 0; k < t.outs.size(); ++k) {
      if (!t.work[k].is_same(t.outs[k])) t.outs[k].copy_(t.work[k]);
    }
  }
}

// n <= kChunk elements of an input as fp32: the tensor itself when it is fp32,
// else a conversion into this thread's buffer `slot` (in cache, next to the pass).
template <typename T>
MAS_KERNELS_INLINE const float* convert_chunk(const T* __restrict x, int64_t n, int slot) {
  thread_local std::vector<float> bufs[3] = {std::vector<float>(kChunk), std::vector<float>(kChunk),
                                             std::vector<float>(kChunk)};
  float* __restrict y = bufs[slot].data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = load_f32(x[i]);
  return y;
}

MAS_KERNELS_INLINE const float* f32_chunk(const at::Tensor& x, int64_t b, int64_t e, int slot) {
  if (!x.defined()) return nullptr;
  switch (x.scalar_type()) {
    case at::kBFloat16:
      return convert_chunk(x.const_data_ptr<at::BFloat16>() + b, e - b, slot);
    case at::kHalf:
      return convert_chunk(x.const_data_ptr<at::Half>() + b, e - b, slot);
    default:
      return x.const_data_ptr<float>() + b;  // float32: checked before the parallel loop
  }
}

// The sum of Omega d^2 runs in fp32 over blocks of this many elements (each SIMD
// lane adds 1024 / 8 terms), and the blocks' sums in double: as exact as one
// double sum for the value's purpose, and a float reduction is what lets the
// loop vectorize inside the target_clones functions (a double one does not).
constexpr int64_t kSumBlock = 1024;

// Software prefetch, kAhead elements ahead in every stream, once per kLine elements (a
// cache line of fp32). On one core of this project's KVM guest (2-core Xeon, 4 KiB pages)
// the step is bound by read misses and page walks, not by bytes: a read-only stream costs
// ~0.45 ns per element, a read-modify-write one ~0.6 (a no-arithmetic kernel of the same
// shape), so theta* and Omega add ~45% to the plain AdamW step (grad + 3 written streams),
// not the 8/28 = 29% that bytes predict. Prefetching 2 KiB ahead (across the hardware
// prefetcher's 4 KiB page boundaries, starting the page walks early) took 6-12% off both
// the plain and the penalty step from memory and costs ~2% in cache; 1-3 KiB measured alike.
constexpr int64_t kAhead = 512;
constexpr int64_t kLine = 16;

template <bool WRITE, typename T>
MAS_KERNELS_INLINE void prefetch(const T* x, int64_t i) {
#if defined(__GNUC__)
  __builtin_prefetch(x + i + kAhead, WRITE ? 1 : 0, 3);  // past the end is harmless: a prefetch never faults
#endif
}

// Calls f(std::bool_constant<b>{}): a run-time flag made a template argument, so that
// each loop is compiled without the branch (a select on a loop-invariant flag inside
// the loop was measured to keep it 4-5x slower than the same loop without it).
//
// The lambdas passed to it are MAS_KERNELS_LAMBDA_INLINE: a generic lambda is otherwise an
// ordinary function that GCC may outline (it did, for every flag combination), and an outlined
// body is compiled for the baseline target, not inside the x86-64-v3 clone of its caller: the
// whole step ran as SSE2 code (4 lanes, no FMA): 1.2x the AVX2 one in cache, ~1.1x from memory.
template <typename F>
MAS_KERNELS_INLINE decltype(auto) with_flag(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}
#if defined(__GNUC__)
#define MAS_KERNELS_LAMBDA_INLINE __attribute__((always_inline))
#else
#define MAS_KERNELS_LAMBDA_INLINE
#endif

// ------------------------------------------------------------------- Adam
struct AdamArgs {
  float two_lam, grad_sign, decay, wd_coupled, lerp_w, beta2, one_minus_beta2, eps;
};

// Elements [0, n) of one tensor; returns sum Omega d^2 over them. COUPLED: add wd * theta to the
// gradient (a weight decay of 0 adds nothing, as in torch: an inf theta does not give 0 * inf);
// decoupled decay multiplies theta by `decay` (1 when there is none, exact). The lerp is
// torch's form for weights below 0.5 (beta1 > 0.5); above, torch's other form may round
// differently in the last bit.
template <typename P, bool PEN, bool AMS, bool COUPLED>
MAS_KERNELS_INLINE double adam_range(P* __restrict p, P* __restrict m, P* __restrict v, P* __restrict vmax,
                                     const float* __restrict g, const float* __restrict a,
                                     const float* __restrict o, int64_t n, const AdamArgs& s, float neg_step_size,
                                     float bc2_sqrt) {
  double acc = 0.0;
  const int64_t block = PEN ? kSumBlock : n;  // without a penalty there is nothing to sum: one loop
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(n, b0 + block);
    float part = 0.f;
    for (int64_t c0 = b0; c0 < b1; c0 += kLine) {
      const int64_t c1 = std::min(b1, c0 + kLine);
      prefetch<true>(p, c0);
      prefetch<true>(m, c0);
      prefetch<true>(v, c0);
      if (AMS) prefetch<true>(vmax, c0);
      prefetch<false>(g, c0);
      if (PEN) {
        prefetch<false>(a, c0);
        prefetch<false>(o, c0);
      }
#pragma omp simd reduction(+ : part)
      for (int64_t i = c0; i < c1; ++i) {
        float pv = load_f32(p[i]);
        float gv = g[i];
        if (PEN) {
          const float d = pv - a[i];
          const float od = o[i] * d;
          gv = gv + s.two_lam * od;
          part += od * d;
        }
        gv = gv * s.grad_sign;
        if (COUPLED) gv = gv + s.wd_coupled * pv;
        pv = pv * s.decay;
        const float m0 = load_f32(m[i]);
        const float mv = m0 + s.lerp_w * (gv - m0);
        float vv = load_f32(v[i]) * s.beta2 + s.one_minus_beta2 * gv * gv;
        m[i] = store_as<P>(mv);
        v[i] = store_as<P>(vv);
        if (AMS) {
          const float vm = load_f32(vmax[i]);
          vv = ((vv > vm) | (vv != vv)) ? vv : vm;  // torch.maximum: NaN wins (| not ||: no branch)
          vmax[i] = store_as<P>(vv);
        }
        const float denom = std::sqrt(vv) / bc2_sqrt + s.eps;
        pv = pv + neg_step_size * (mv / denom);
        p[i] = store_as<P>(pv);
      }
    }
    acc += part;
  }
  return acc;
}

template <typename P>
MAS_KERNELS_INLINE double adam_piece(const StepTensor& t, int64_t b, int64_t e, const AdamArgs& s, bool pen,
                                     bool ams) {
  P* p = t.work[0].data_ptr<P>() + b;
  P* m = t.work[1].data_ptr<P>() + b;
  P* v = t.work[2].data_ptr<P>() + b;
  P* vmax = ams ? t.work[3].data_ptr<P>() + b : nullptr;
  const float* g = f32_chunk(t.g, b, e, 0);
  const float* a = f32_chunk(t.a, b, e, 1);
  const float* o = f32_chunk(t.o, b, e, 2);
  return with_flag(pen, [&](auto PEN) MAS_KERNELS_LAMBDA_INLINE {
    return with_flag(ams, [&](auto AMS) MAS_KERNELS_LAMBDA_INLINE {
      return with_flag(s.wd_coupled != 0.f, [&](auto COUPLED) MAS_KERNELS_LAMBDA_INLINE {
        constexpr bool pen_ = decltype(PEN)::value, ams_ = decltype(AMS)::value, coupled_ = decltype(COUPLED)::value;
        return adam_range<P, pen_, ams_, coupled_>(p, m, v, vmax, g, a, o, e - b, s, t.neg_step_size, t.bc2_sqrt);
      });
    });
  });
}

MAS_KERNELS_CLONES double adam_chunk(const StepTensor& t, int64_t b, int64_t e, const AdamArgs& s, bool pen,
                                     bool ams) {
  switch (t.work[0].scalar_type()) {
    case at::kBFloat16:
      return adam_piece<at::BFloat16>(t, b, e, s, pen, ams);
    case at::kHalf:
      return adam_piece<at::Half>(t, b, e, s, pen, ams);
    default:
      return adam_piece<float>(t, b, e, s, pen, ams);  // dtypes checked before the parallel loop
  }
}

// -------------------------------------------------------------------- SGD
struct SgdArgs {
  float two_lam, grad_sign, wd, momentum, one_minus_dampening, neg_lr;
};

struct SgdFlags {
  bool pen, mom, nest, first;
};

template <typename P, bool PEN, bool WD, bool MOM, bool NEST, bool FIRST>
MAS_KERNELS_INLINE double sgd_range(P* __restrict p, P* __restrict buf, const float* __restrict g,
                                    const float* __restrict a, const float* __restrict o, int64_t n,
                                    const SgdArgs& s) {
  double acc = 0.0;
  const int64_t block = PEN ? kSumBlock : n;  // without a penalty there is nothing to sum: one loop
  for (int64_t b0 = 0; b0 < n; b0 += block) {
    const int64_t b1 = std::min(n, b0 + block);
    float part = 0.f;
    for (int64_t c0 = b0; c0 < b1; c0 += kLine) {
      const int64_t c1 = std::min(b1, c0 + kLine);
      prefetch<true>(p, c0);
      if (MOM) prefetch<true>(buf, c0);
      prefetch<false>(g, c0);
      if (PEN) {
        prefetch<false>(a, c0);
        prefetch<false>(o, c0);
      }
#pragma omp simd reduction(+ : part)
      for (int64_t i = c0; i < c1; ++i) {
        float pv = load_f32(p[i]);
        float gv = g[i];
        if (PEN) {
          const float d = pv - a[i];
          const float od = o[i] * d;
          gv = gv + s.two_lam * od;
          part += od * d;
        }
        gv = gv * s.grad_sign;
        if (WD) gv = gv + s.wd * pv;
        if (MOM) {
          // torch.optim.SGD: the buffer starts as a copy of the first gradient.
          const float bv = FIRST ? gv : load_f32(buf[i]) * s.momentum + s.one_minus_dampening * gv;
          buf[i] = store_as<P>(bv);
          gv = NEST ? gv + s.momentum * bv : bv;
        }
        pv = pv + s.neg_lr * gv;
        p[i] = store_as<P>(pv);
      }
    }
    acc += part;
  }
  return acc;
}

template <typename P>
MAS_KERNELS_INLINE double sgd_piece(const StepTensor& t, int64_t b, int64_t e, const SgdArgs& s, SgdFlags f) {
  P* p = t.work[0].data_ptr<P>() + b;
  P* buf = f.mom ? t.work[1].data_ptr<P>() + b : nullptr;
  const float* g = f32_chunk(t.g, b, e, 0);
  const float* a = f32_chunk(t.a, b, e, 1);
  const float* o = f32_chunk(t.o, b, e, 2);
  return with_flag(f.pen, [&](auto PEN) MAS_KERNELS_LAMBDA_INLINE {
    return with_flag(s.wd != 0.f, [&](auto WD) MAS_KERNELS_LAMBDA_INLINE {
      constexpr bool pen_ = decltype(PEN)::value, wd_ = decltype(WD)::value;
      if (!f.mom) return sgd_range<P, pen_, wd_, false, false, false>(p, buf, g, a, o, e - b, s);
      return with_flag(f.nest, [&](auto NEST) MAS_KERNELS_LAMBDA_INLINE {
        return with_flag(f.first, [&](auto FIRST) MAS_KERNELS_LAMBDA_INLINE {
          constexpr bool nest_ = decltype(NEST)::value, first_ = decltype(FIRST)::value;
          return sgd_range<P, pen_, wd_, true, nest_, first_>(p, buf, g, a, o, e - b, s);
        });
      });
    });
  });
}

MAS_KERNELS_CLONES double sgd_chunk(const StepTensor& t, int64_t b, int64_t e, const SgdArgs& s, SgdFlags f) {
  switch (t.work[0].scalar_type()) {
    case at::kBFloat16:
      return sgd_piece<at::BFloat16>(t, b, e, s, f);
    case at::kHalf:
      return sgd_piece<at::Half>(t, b, e, s, f);
    default:
      return sgd_piece<float>(t, b, e, s, f);
  }
}

// ------------------------------------------------------------ shared driver
// All tensors shared by the threads; returns sum Omega d^2. One partial per
// chunk, added in order: the value does not depend on the thread count.
template <typename F>
double run_all(const std::vector<StepTensor>& tensors, F&& chunk_fn) {
  std::vector<int64_t> numels;
  numels.reserve(tensors.size());
  for (const auto& t : tensors) numels.push_back(t.work[0].numel());
  const WorkList work(numels);
  std::vector<double> partial(static_cast<size_t>(work.n_chunks), 0.0);
  parallel_chunks(work, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double s = 0.0;
      work.for_each_piece(c, [&](int64_t i, int64_t b, int64_t e) { s += chunk_fn(tensors[i], b, e); });
      partial[c] = s;
    }
  });
  double sum = 0.0;
  for (double v : partial) sum += v;
  return sum;
}

bool is_float_type(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

std::string name(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

// The checks both ops make before anything is written.
void check_common(const char* op, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                  const std::vector<std::pair<const char*, const std::vector<at::Tensor>*>>& states,
                  const std::vector<at::Tensor>& anchors, const std::vector<at::Tensor>& omegas, double lam) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n, "mas_kernels ", op, ": grads has ", grads.size(), " tensors but params has ",
                    n);
  TORCH_CHECK_VALUE(anchors.size() == omegas.size() && (anchors.empty() || anchors.size() == n), "mas_kernels ", op,
                    ": anchors and omegas must both be empty (no penalty) or both have one tensor per parameter");
  const bool pen = !anchors.empty();
  std::vector<at::Tensor> outs(params), a_ins, o_ins;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK_VALUE(p.device().is_cpu() && grads[i].device().is_cpu(), "mas_kernels ", op,
                      ": the native kernels take CPU tensors (", name("params", i), ")");
    TORCH_CHECK_VALUE(is_float_type(p) && is_float_type(grads[i]), "mas_kernels ", op, ": ", name("params", i),
                      " and its grad must be float32/bfloat16/float16");
    TORCH_CHECK_VALUE(grads[i].sizes() == p.sizes(), "mas_kernels ", op, ": ", name("grads", i), " has shape ",
                      grads[i].sizes(), " but ", name("params", i), " has ", p.sizes());
    check_writable(p, op, "params", static_cast<int64_t>(i));
    for (const auto& [list, xs] : states) {
      const auto& x = (*xs)[i];
      TORCH_CHECK_VALUE(x.device().is_cpu() && x.sizes() == p.sizes() && x.scalar_type() == p.scalar_type(),
                        "mas_kernels ", op, ": ", name(list, i), " must be a CPU tensor of its parameter's shape ",
                        p.sizes(), " and dtype ", p.scalar_type(), " (as torch.optim keeps it)");
      check_writable(x, op, list, static_cast<int64_t>(i));
    }
    if (pen) {
      for (const auto& [list, x] : {std::pair<const char*, const at::Tensor*>{"anchors", &anchors[i]},
                                    std::pair<const char*, const at::Tensor*>{"omegas", &omegas[i]}}) {
        TORCH_CHECK_VALUE(x->device().is_cpu() && x->sizes() == p.sizes() && is_float_type(*x), "mas_kernels ", op,
                          ": ", name(list, i), " must be a float32/bfloat16/float16 CPU tensor of shape ", p.sizes());
      }
    }
  }
  check_scalar(lam, 2.0, op, "lam");
  // Every written tensor apart from every other, and the inputs apart from all of them but
  // their own parameter (read before it is written, element for element).
  for (const auto& [list, xs] : states) outs.insert(outs.end(), xs->begin(), xs->end());
  std::vector<std::vector<at::Tensor>> ins{grads};
  if (pen) {
    ins.push_back(anchors);
    ins.push_back(omegas);
  }
  TORCH_CHECK_VALUE(!cross_tensor_hazard(outs, ins), "mas_kernels ", op,
                    ": some of the tensors it writes (params and the optimizer state) share memory with each other "
                    "or with grads/anchors/omegas; pass separate tensors");
}

}  // namespace

at::Tensor adam_penalty_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                              const std::vector<at::Tensor>& max_exp_avg_sqs,
                              const std::vector<at::Tensor>& state_steps, const std::vector<at::Tensor>& anchors,
                              const std::vector<at::Tensor>& omegas, double lam, double lr, double beta1,
                              double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                              bool maximize) {
  const char* op = "adam_penalty_step_";
  const size_t n = params.size();
  TORCH_CHECK_VALUE(exp_avgs.size() == n && exp_avg_sqs.size() == n && state_steps.size() == n, "mas_kernels ", op,
                    ": exp_avgs, exp_avg_sqs and state_steps need one tensor per parameter (", n, ")");
  const bool ams = !max_exp_avg_sqs.empty();
  TORCH_CHECK_VALUE(!ams || max_exp_avg_sqs.size() == n, "mas_kernels ", op,
                    ": max_exp_avg_sqs must be empty (no amsgrad) or have one tensor per parameter");
  std::vector<std::pair<const char*, const std::vector<at::Tensor>*>> states{{"exp_avgs", &exp_avgs},
                                                                             {"exp_avg_sqs", &exp_avg_sqs}};
  if (ams) states.push_back({"max_exp_avg_sqs", &max_exp_avg_sqs});
  check_common(op, params, grads, states, anchors, omegas, lam);
  for (size_t i = 0; i < n; ++i) {
    const auto& s = state_steps[i];
    TORCH_CHECK_VALUE(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.numel() == 1, "mas_kernels ", op,
                      ": ", name("state_steps", i), " must be a float32 CPU scalar tensor (torch.optim's step "
                      "when neither capturable nor fused)");
  }
  for (const auto& [arg, x] : {std::pair<const char*, double>{"lr", lr}, {"beta1", beta1}, {"beta2", beta2},
                               {"eps", eps}, {"weight_decay", weight_decay}}) {
    check_scalar(x, 1.0, op, arg);
  }
  const bool pen = !anchors.empty();
  const AdamArgs args{static_cast<float>(2.0 * lam),
                      maximize ? -1.f : 1.f,
                      static_cast<float>(decoupled_weight_decay ? 1.0 - lr * weight_decay : 1.0),
                      static_cast<float>(decoupled_weight_decay ? 0.0 : weight_decay),
                      static_cast<float>(1.0 - beta1),
                      static_cast<float>(beta2),
                      static_cast<float>(1.0 - beta2),
                      static_cast<float>(eps)};
  std::vector<StepTensor> tensors;
  tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> outs;
    outs.reserve(4);
    for (const auto* list : {&params, &exp_avgs, &exp_avg_sqs}) outs.push_back((*list)[i]);
    if (ams) outs.push_back(max_exp_avg_sqs[i]);
    tensors.push_back(prepare_step(std::move(outs), grads[i], pen ? anchors[i] : at::Tensor(),
                                   pen ? omegas[i] : at::Tensor()));
    // The step count, as torch.optim: incremented, then the bias corrections from it (in double).
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.f;
    const double st = *step;
    tensors.back().neg_step_size = static_cast<float>(-(lr / (1.0 - std::pow(beta1, st))));
    tensors.back().bc2_sqrt = static_cast<float>(std::pow(1.0 - std::pow(beta2, st), 0.5));
  }
  const double sum =
      run_all(tensors, [&](const StepTensor& t, int64_t b, int64_t e) { return adam_chunk(t, b, e, args, pen, ams); });
  finish_step(tensors);
  return at::scalar_tensor(static_cast<float>(lam * sum), at::TensorOptions().dtype(at::kFloat));
}

at::Tensor sgd_penalty_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& anchors,
                             const std::vector<at::Tensor>& omegas, double lam, double lr, double weight_decay,
                             double momentum, double dampening, bool nesterov, bool maximize, bool first_step) {
  const char* op = "sgd_penalty_step_";
  const size_t n = params.size();
  const bool mom = momentum != 0.0;
  TORCH_CHECK_VALUE(momentum_buffers.size() == (mom ? n : 0) || n == 0, "mas_kernels ", op, ": momentum_buffers has ",
                    momentum_buffers.size(), " tensors with momentum=", momentum,
                    "; pass one per parameter when momentum != 0, none when it is 0");
  std::vector<std::pair<const char*, const std::vector<at::Tensor>*>> states;
  if (mom) states.push_back({"momentum_buffers", &momentum_buffers});
  check_common(op, params, grads, states, anchors, omegas, lam);
  for (const auto& [arg, x] : {std::pair<const char*, double>{"lr", lr}, {"weight_decay", weight_decay},
                               {"momentum", momentum}, {"dampening", dampening}}) {
    check_scalar(x, 1.0, op, arg);
  }
  const bool pen = !anchors.empty();
  const SgdArgs args{static_cast<float>(2.0 * lam), maximize ? -1.f : 1.f, static_cast<float>(weight_decay),
                     static_cast<float>(momentum), static_cast<float>(1.0 - dampening), static_cast<float>(-lr)};
  std::vector<StepTensor> tensors;
  tensors.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> outs;
    outs.reserve(2);
    outs.push_back(params[i]);
    if (mom) outs.push_back(momentum_buffers[i]);
    tensors.push_back(prepare_step(std::move(outs), grads[i], pen ? anchors[i] : at::Tensor(),
                                   pen ? omegas[i] : at::Tensor()));
  }
  const double sum = run_all(tensors, [&](const StepTensor& t, int64_t b, int64_t e) {
    return sgd_chunk(t, b, e, args, SgdFlags{pen, mom, nesterov, first_step});
  });
  finish_step(tensors);
  return at::scalar_tensor(static_cast<float>(lam * sum), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace mas_kernels
