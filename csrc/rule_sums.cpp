// The exact rule's small per-sample sums, reduced to MAS numerators in the same call: no (N, D) temporary, no
// Python op per step (on tiny transformers a rule's four or five small ops cost more than its arithmetic).
//
// abs_position_sums_: acc (J) += sum_s |sum_t d[s, t, :]|, d (S, T, J): a Linear's (Conv1D's) bias on sequences.
// embedding_abs_rows_: acc (V, D) row v += |sum_{t: ids[s, t] = v} d[s, t, :]| for every sample s and distinct
//   id v of its positions (padding_idx skipped): an embedding's per-sample gradient rows, then their abs.
// layer_norm_abs_sums_: acc_w += sum_s |sum_t d * x_hat|, acc_b += sum_s |sum_t d| (norm_sums.cpp's sums).
// channel_abs_sums_: a BatchNorm's with running statistics, per channel c: acc_w[c] += sum_s |invstd_c sum_l
//   d (x - mean_c)|, acc_b[c] += sum_s |sum_l d| (norm_sums.cpp's channel_sums), invstd_c = 1 / sqrt(var_c + eps).
// linear_abs_sums_: every Linear (Conv1D) of a batch in one call: per layer, abs_bmm_accumulate_ for the weight
//   and abs_position_sums_ for the bias (on a tiny transformer the Python between those calls, per layer, cost
//   a third of the calls themselves).
//
// acc is contiguous float32; d float32/bfloat16/float16 with unit stride along its last dim (any strides
// otherwise: an expanded or permuted batch needs no copy). The threads split the columns, never the
// samples: every element is summed in sample (and position) order whatever the thread count.
#include "ops.h"

#include "multi_tensor.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace mas_kernels {

namespace {

constexpr int64_t kColumns = 16;  // columns per work item: one AVX-512 vector, and 64-byte lines of acc

void check_acc(const at::Tensor& acc, const char* op, const char* name) {
  TORCH_CHECK(acc.device().is_cpu() && acc.scalar_type() == at::kFloat && acc.is_contiguous(), op, ": ", name,
              " must be a contiguous float32 CPU tensor, got ", acc.scalar_type(), " on ", acc.device());
}

void check_d(const at::Tensor& d, const char* op) {
  TORCH_CHECK(d.device().is_cpu() && d.dim() == 3 && (d.stride(2) == 1 || d.size(2) <= 1), op,
              ": d must be a (S, T, D) CPU tensor with unit stride along D, got shape ", d.sizes(), " strides ",
              d.strides());
}

// A norm's two numerators (either may be absent): both checked (contiguous float32, `size` elements) before
// either is written, then f(0 for the weight / 1 for the bias, its data).
template <typename F>
void weight_and_bias(const std::optional<at::Tensor>& acc_w, const std::optional<at::Tensor>& acc_b, int64_t size,
                     const char* op, const char* what, F&& f) {
  const std::optional<at::Tensor>* accs[2] = {&acc_w, &acc_b};
  for (int64_t which = 0; which < 2; ++which) {
    if (!accs[which]->has_value()) continue;
    const at::Tensor& acc = accs[which]->value();
    check_acc(acc, op, which == 0 ? "acc_w" : "acc_b");
    TORCH_CHECK(acc.numel() == size, op, ": an accumulator has ", acc.numel(), " elements, the ", what, " ", size);
  }
  for (int64_t which = 0; which < 2; ++which)
    if (accs[which]->has_value()) f(which, accs[which]->value().data_ptr<float>());
}

// Column blocks [c0, c1) of D over the threads, each large enough to be worth a thread.
template <typename F>
void over_columns(int64_t D, int64_t work_per_column, F&& f) {
  const int64_t blocks = (D + kColumns - 1) / kColumns;
  const int64_t grain = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, work_per_column * kColumns));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    f(b0 * kColumns, std::min(D, b1 * kColumns));
  });
}

template <typename T>
MAS_KERNELS_INLINE void add_row(const T* __restrict src, int64_t n, float* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += load_f32(src[i]);
}

MAS_KERNELS_INLINE void add_abs(const float* __restrict src, int64_t n, float* __restrict dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += std::fabs(src[i]);
}

template <typename T>
MAS_KERNELS_INLINE void position_sums(const T* d, int64_t S, int64_t T_, int64_t s0, int64_t s1, int64_t c0,
                                      int64_t c1, float* acc) {
  float sum[kColumns];
  for (int64_t c = c0; c < c1; c += kColumns) {
    const int64_t n = std::min(kColumns, c1 - c);
    for (int64_t s = 0; s < S; ++s) {
      std::fill(sum, sum + n, 0.0f);
      for (int64_t t = 0; t < T_; ++t) add_row(d + s * s0 + t * s1 + c, n, sum);
      add_abs(sum, n, acc + c);
    }
  }
}

MAS_KERNELS_CLONES void position_sums_of(const float* d, int64_t S, int64_t T, int64_t s0, int64_t s1, int64_t c0,
                                         int64_t c1, float* acc) {
  position_sums(d, S, T, s0, s1, c0, c1, acc);
}
MAS_KERNELS_CLONES void position_sums_of(const at::BFloat16* d, int64_t S, int64_t T, int64_t s0, int64_t s1,
                                         int64_t c0, int64_t c1, float* acc) {
  position_sums(d, S, T, s0, s1, c0, c1, acc);
}
MAS_KERNELS_CLONES void position_sums_of(const at::Half* d, int64_t S, int64_t T, int64_t s0, int64_t s1, int64_t c0,
                                         int64_t c1, float* acc) {
  position_sums(d, S, T, s0, s1, c0, c1, acc);
}

// An embedding call's per-sample groups of positions: group g holds the positions pos[start[g]:start[g + 1]] of
// sample sample[g] whose id is id[g] (padding dropped); groups in sample order, then id order, each group's
// positions in position order.
struct Groups {
  std::vector<int64_t> pos, start, sample, id;
};

template <typename I>
Groups group_positions(const at::Tensor& ids, int64_t V, int64_t padding_idx) {
  const int64_t S = ids.size(0), T = ids.size(1), i0 = ids.stride(0), i1 = ids.stride(1);
  const I* const p = ids.const_data_ptr<I>();
  Groups g;
  g.pos.reserve(S * T);
  std::vector<int64_t> pos;
  pos.reserve(T);
  for (int64_t s = 0; s < S; ++s) {
    const I* const row = p + s * i0;
    auto id = [&](int64_t t) { return static_cast<int64_t>(row[t * i1]); };
    pos.clear();
    for (int64_t t = 0; t < T; ++t) {
      const int64_t v = id(t);
      TORCH_CHECK(v >= 0 && v < V, "mas_kernels embedding_abs_rows_: id ", v, " out of range [0, ", V, ")");
      if (v != padding_idx) pos.push_back(t);
    }
    std::stable_sort(pos.begin(), pos.end(), [&](int64_t a, int64_t b) { return id(a) < id(b); });
    for (size_t k = 0; k < pos.size(); ++k) {
      if (k == 0 || id(pos[k]) != id(pos[k - 1])) {
        g.start.push_back(static_cast<int64_t>(g.pos.size()));
        g.sample.push_back(s);
        g.id.push_back(id(pos[k]));
      }
      g.pos.push_back(pos[k]);
    }
  }
  g.start.push_back(static_cast<int64_t>(g.pos.size()));
  return g;
}

template <typename T>
MAS_KERNELS_INLINE void group_rows(const T* d, const Groups& g, int64_t s0, int64_t s1, int64_t c0, int64_t c1,
                                   float* acc, int64_t D) {
  float sum[kColumns];
  const int64_t groups = static_cast<int64_t>(g.id.size());
  for (int64_t c = c0; c < c1; c += kColumns) {
    const int64_t n = std::min(kColumns, c1 - c);
    for (int64_t k = 0; k < groups; ++k) {
      std::fill(sum, sum + n, 0.0f);
      const T* const base = d + g.sample[k] * s0 + c;
      for (int64_t j = g.start[k]; j < g.start[k + 1]; ++j) add_row(base + g.pos[j] * s1, n, sum);
      add_abs(sum, n, acc + g.id[k] * D + c);
    }
  }
}

MAS_KERNELS_CLONES void group_rows_of(const float* d, const Groups& g, int64_t s0, int64_t s1, int64_t c0, int64_t c1,
                                      float* acc, int64_t D) {
  group_rows(d, g, s0, s1, c0, c1, acc, D);
}
MAS_KERNELS_CLONES void group_rows_of(const at::BFloat16* d, const Groups& g, int64_t s0, int64_t s1, int64_t c0,
                                      int64_t c1, float* acc, int64_t D) {
  group_rows(d, g, s0, s1, c0, c1, acc, D);
}
MAS_KERNELS_CLONES void group_rows_of(const at::Half* d, const Groups& g, int64_t s0, int64_t s1, int64_t c0,
                                      int64_t c1, float* acc, int64_t D) {
  group_rows(d, g, s0, s1, c0, c1, acc, D);
}

}  // namespace

void abs_position_sums_(at::Tensor acc, const at::Tensor& d) {
  const char* op = "mas_kernels abs_position_sums_";
  check_acc(acc, op, "acc");
  check_d(d, op);
  const int64_t S = d.size(0), T = d.size(1), J = d.size(2);
  TORCH_CHECK(acc.numel() == J, op, ": acc has ", acc.numel(), " elements, d's rows ", J);
  if (S == 0 || T == 0 || J == 0) return;
  float* const pa = acc.data_ptr<float>();
  const int64_t s0 = d.stride(0), s1 = d.stride(1);
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    const T_* const pd = d.const_data_ptr<T_>();
    over_columns(J, S * T, [&](int64_t c0, int64_t c1) { position_sums_of(pd, S, T, s0, s1, c0, c1, pa); });
  };
  on_16_or_32_bit(d, op, run);
}

void embedding_abs_rows_(at::Tensor acc, const at::Tensor& ids, const at::Tensor& d, int64_t padding_idx) {
  const char* op = "mas_kernels embedding_abs_rows_";
  check_acc(acc, op, "acc");
  check_d(d, op);
  TORCH_CHECK(acc.dim() == 2 && ids.dim() == 2 && ids.device().is_cpu() &&
                  (ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt) && ids.size(0) == d.size(0) &&
                  ids.size(1) == d.size(1) && acc.size(1) == d.size(2),
              op, ": expected acc (V, D), integer ids (S, T) and d (S, T, D), got ", acc.sizes(), ", ",
              ids.scalar_type(), " ", ids.sizes(), " and ", d.sizes());
  const int64_t S = d.size(0), T = d.size(1), V = acc.size(0), D = acc.size(1);
  if (S == 0 || T == 0 || D == 0) return;
  const Groups g = ids.scalar_type() == at::kLong ? group_positions<int64_t>(ids, V, padding_idx)
                                                  : group_positions<int32_t>(ids, V, padding_idx);
  float* const pa = acc.data_ptr<float>();
  const int64_t s0 = d.stride(0), s1 = d.stride(1);
  auto run = [&](auto tag) {
    using T_ = decltype(tag);
    const T_* const pd = d.const_data_ptr<T_>();
    over_columns(D, S * T, [&](int64_t c0, int64_t c1) { group_rows_of(pd, g, s0, s1, c0, c1, pa, D); });
  };
  on_16_or_32_bit(d, op, run);
}

void layer_norm_abs_sums_(const std::optional<at::Tensor>& acc_w, const std::optional<at::Tensor>& acc_b,
                          const at::Tensor& x, const at::Tensor& d, double eps, bool rms) {
  const char* op = "mas_kernels layer_norm_abs_sums_";
  const at::Tensor sums = layer_norm_sums(x, d, eps, rms);  // (N, 2, D), its checks made
  const int64_t N = sums.size(0), D = sums.size(2);
  const float* const ps = sums.const_data_ptr<float>();
  weight_and_bias(acc_w, acc_b, D, op, "rows", [&](int64_t which, float* pa) {
    for (int64_t s = 0; s < N; ++s) add_abs(ps + (s * 2 + which) * D, D, pa);
  });
}

void linear_abs_sums_(const std::vector<std::optional<at::Tensor>>& accs_w,
                      const std::vector<std::optional<at::Tensor>>& accs_b, const std::vector<at::Tensor>& deltas,
                      const std::vector<at::Tensor>& xs, bool transposed, int64_t memory_budget) {
  const char* op = "mas_kernels linear_abs_sums_";
  const size_t L = deltas.size();
  TORCH_CHECK(accs_w.size() == L && accs_b.size() == L && xs.size() == L, op,
              ": one acc_w, acc_b, delta and x per layer, got ", accs_w.size(), ", ", accs_b.size(), ", ", L, " and ",
              xs.size());
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor& d = deltas[i];
    if (accs_w[i].has_value()) {
      // acc (J, I) += sum_s |d_s^T x_s| (Conv1D, transposed: its (I, J) weight, |x_s^T d_s|)
      if (transposed)
        abs_bmm_accumulate_(accs_w[i].value(), xs[i], d, 1.0, memory_budget);
      else
        abs_bmm_accumulate_(accs_w[i].value(), d, xs[i], 1.0, memory_budget);
    }
    if (accs_b[i].has_value())
      abs_position_sums_(accs_b[i].value(), d.dim() == 3 && d.size(2) > 1 && d.stride(2) != 1 ? d.contiguous() : d);
  }
}

void channel_abs_sums_(const std::optional<at::Tensor>& acc_w, const std::optional<at::Tensor>& acc_b,
                       const at::Tensor& x, const at::Tensor& d, const at::Tensor& running_mean,
                       const at::Tensor& running_var, double eps) {
  const char* op = "mas_kernels channel_abs_sums_";
  TORCH_CHECK(x.dim() >= 2 && d.sizes() == x.sizes(), op, ": expected x and d of one shape (N, C, *), got ",
              x.sizes(), " and ", d.sizes());
  TORCH_CHECK(running_var.device().is_cpu() && running_var.scalar_type() == at::kFloat && running_var.dim() == 1 &&
                  running_var.numel() == x.size(1),
              op, ": running_var must be a float32 CPU tensor of the ", x.size(1), " channels");
  const int64_t n = x.size(0), c = x.size(1);
  // (N, C, L) contiguous views (copies only where the layout needs one), then its checks made by channel_sums
  const at::Tensor sums = channel_sums(x.reshape({n, c, -1}).contiguous(), d.reshape({n, c, -1}).contiguous(),
                                       running_mean.to(at::kFloat).contiguous());  // (N, C, 2)
  const int64_t N = sums.size(0), C = sums.size(1);
  const float* const ps = sums.const_data_ptr<float>();
  const at::Tensor var = running_var.contiguous();
  const float* const pv = var.const_data_ptr<float>();
  weight_and_bias(acc_w, acc_b, C, op, "channels", [&](int64_t which, float* pa) {
    for (int64_t c = 0; c < C; ++c) {
      // the invstd as torch.rsqrt(var + eps) in float32; the samples summed in order, then added
      const float scale = which == 0 ? 1.0f / std::sqrt(pv[c] + static_cast<float>(eps)) : 1.0f;
      float total = 0.0f;
      for (int64_t s = 0; s < N; ++s) total += std::fabs(ps[(s * C + c) * 2 + which] * scale);
      pa[c] += total;
    }
  });
}

}  // namespace mas_kernels
