// float64 calls of the native kernels (float64.cpp): the ops' PyTorch
// definitions in ATen ops. The kernels send a call here when any of its
// tensors is float64, after their checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <initializer_list>
#include <vector>

namespace mas_kernels {

bool any_double(std::initializer_list<const std::vector<at::Tensor>*> lists);

at::Tensor penalty_grad_f64(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                            const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>& grads);
void abs_accumulate_f64(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors, double alpha);
void abs_outer_f64(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha);
void abs_bmm_f64(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha, int64_t memory_budget);

}  // namespace mas_kernels
