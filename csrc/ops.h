// The ops of mas_kernels._C (see mas_kernels/ops/*.py for the contract).
// The Python layer validates arguments and names the culprit; the checks here
// only guard the kernels against calls that bypass it. A call with a float64
// tensor runs the op's PyTorch definition in ATen ops (float64.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace mas_kernels {

// omega += alpha * |a|^T @ |b|; omega (J, I) fp32/fp64, a (N, J), b (N, I) fp32/bf16/fp16/fp64.
void abs_outer_accumulate_(at::Tensor omega, const at::Tensor& a, const at::Tensor& b, double alpha);

// omega_i += alpha * |t_i| for every i; omegas fp32/fp64, tensors fp32/bf16/fp16/fp64.
void abs_accumulate_(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors, double alpha);

// Returns lam * sum_i sum Omega_i (p_i - a_i)^2 (0-dim, fp64 when a tensor is fp64, else fp32; Omega fp32/bf16/fp16/fp64) and adds
// 2 lam Omega_i (p_i - a_i) into grads[i].
at::Tensor penalty_grad_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                         const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>& grads);

// One torch.optim Adam/AdamW step with grad + 2 lam Omega_i (p_i - a_i) as the gradient (anchors and
// omegas empty: no penalty); increments state_steps; returns the penalty before the step (0-dim fp32).
at::Tensor adam_penalty_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                              const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs,
                              const std::vector<at::Tensor>& max_exp_avg_sqs,
                              const std::vector<at::Tensor>& state_steps, const std::vector<at::Tensor>& anchors,
                              const std::vector<at::Tensor>& omegas, double lam, double lr, double beta1,
                              double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                              bool maximize);

// The same for one torch.optim SGD step (momentum_buffers empty when momentum == 0).
at::Tensor sgd_penalty_step_(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                             const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& anchors,
                             const std::vector<at::Tensor>& omegas, double lam, double lr, double weight_decay,
                             double momentum, double dampening, bool nesterov, bool maximize, bool first_step);

// omega += alpha * sum_s |a_s^T b_s|; omega (J, I) fp32/fp64, a (S, T, J), b (S, T, I) fp32/bf16/fp16/fp64.
void abs_bmm_accumulate_(at::Tensor omega, const at::Tensor& a, const at::Tensor& b, double alpha,
                         int64_t memory_budget);

// The strategy abs_bmm_accumulate_ takes for a shape: samples per chunked-bmm
// chunk, or 0 for the register tiles (and for T <= 1, which is abs_outer).
int64_t abs_bmm_bmm_chunk(int64_t S, int64_t T, int64_t J, int64_t I, int64_t memory_budget);

// omega += alpha * sum_k |g_k|, g_k the per-sample weight gradient of a convolution (see conv_exact.cpp):
// omega (G, Og, Cg*K) fp32, x (N, C, D, H, W) the input (zeros padded before each dim by padding, and after
// it as far as the output reaches), delta (N, O, D', H', W'), fp32 contiguous.
void conv_weight_abs_sum_(at::Tensor omega, const at::Tensor& x, const at::Tensor& delta, at::IntArrayRef kernel,
                          at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding, int64_t groups,
                          double alpha, int64_t memory_budget);

// (N, C, 2) float32: sum_l d * (x - mean_c) and sum_l d per sample and channel; x, d (N, C, L)
// contiguous float32/bfloat16/float16, mean (C,) float32 (see norm_sums.cpp).
at::Tensor channel_sums(const at::Tensor& x, const at::Tensor& d, const at::Tensor& mean);

// (N, 2, D) float32: per sample, sum_t d * x_hat and sum_t d over its rows of a LayerNorm's (rms: RMSNorm's)
// input x and output gradient d, (N, T, D) contiguous float32/bfloat16/float16 (see norm_sums.cpp).
at::Tensor layer_norm_sums(const at::Tensor& x, const at::Tensor& d, double eps, bool rms);

// The exact rule's small sums reduced to numerators in place (see rule_sums.cpp); acc contiguous float32,
// d (S, T, D) float32/bfloat16/float16 with unit stride along D.
// acc (D) += sum_s |sum_t d[s, t]|
void abs_position_sums_(at::Tensor acc, const at::Tensor& d);
// acc (V, D) row v += |sum_{t: ids[s, t] = v} d[s, t]| per sample s and distinct id v (padding_idx: skipped; -1
// for none); ids (S, T) int64/int32, any strides.
void embedding_abs_rows_(at::Tensor acc, const at::Tensor& ids, const at::Tensor& d, int64_t padding_idx);
// acc_w += sum_s |sum_t d * x_hat|, acc_b += sum_s |sum_t d| (either may be absent); x, d as layer_norm_sums.
void layer_norm_abs_sums_(const std::optional<at::Tensor>& acc_w, const std::optional<at::Tensor>& acc_b,
                          const at::Tensor& x, const at::Tensor& d, double eps, bool rms);
// Per layer i: acc_w[i] += sum_s |d_s^T x_s| (transposed: |x_s^T d_s|), acc_b[i] += sum_s |sum_t d_s[t]| (either may
// be absent), with d (S, T, J) and x (S, T, I) as abs_bmm_accumulate_ takes them: every Linear of a batch.
void linear_abs_sums_(const std::vector<std::optional<at::Tensor>>& accs_w,
                      const std::vector<std::optional<at::Tensor>>& accs_b, const std::vector<at::Tensor>& deltas,
                      const std::vector<at::Tensor>& xs, bool transposed, int64_t memory_budget);
// acc_w[c] += sum_s |sum_l d (x - mean_c)| / sqrt(var_c + eps), acc_b[c] += sum_s |sum_l d| (either may be
// absent): a BatchNorm's with running statistics; x, d (N, C, *) of one shape and dtype (any strides),
// running_mean (C,) float, running_var (C,) float32.
void channel_abs_sums_(const std::optional<at::Tensor>& acc_w, const std::optional<at::Tensor>& acc_b,
                       const at::Tensor& x, const at::Tensor& d, const at::Tensor& running_mean,
                       const at::Tensor& running_var, double eps);

// One layer and direction of an RNN/LSTM/GRU step by step (see rnn_steps.cpp): the forward from the input
// projection zi and W_hh, and the backward through time to dzi and the initial state's gradients.
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_steps_forward(const std::string& mode, const at::Tensor& zi,
                                                                 const at::Tensor& w_hh, const at::Tensor& b_hh,
                                                                 const at::Tensor& h0, const at::Tensor& c0,
                                                                 bool reverse);
std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_steps_backward(
    const std::string& mode, const at::Tensor& h_seq, const at::Tensor& saved, const at::Tensor& c_seq,
    const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh, const at::Tensor& dh_seq,
    const at::Tensor& dh_n, const at::Tensor& dc_n, bool reverse);

}  // namespace mas_kernels
