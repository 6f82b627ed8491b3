// The ops of mas_kernels._C (see mas_kernels/ops/*.py for the contract).
// The Python layer validates arguments and names the culprit; the checks here
// only guard the kernels against calls that bypass it. A call with a float64
// tensor runs the op's PyTorch definition in ATen ops (float64.cpp).
#pragma once

#include <ATen/core/Tensor.h>

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

// omega += alpha * sum_s |a_s^T b_s|; omega (J, I) fp32/fp64, a (S, T, J), b (S, T, I) fp32/bf16/fp16/fp64.
void abs_bmm_accumulate_(at::Tensor omega, const at::Tensor& a, const at::Tensor& b, double alpha,
                         int64_t memory_budget);

// The strategy abs_bmm_accumulate_ takes for a shape: samples per chunked-bmm
// chunk, or 0 for the register tiles (and for T <= 1, which is abs_outer).
int64_t abs_bmm_bmm_chunk(int64_t S, int64_t T, int64_t J, int64_t I, int64_t memory_budget);

}  // namespace mas_kernels
