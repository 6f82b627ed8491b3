// The native kernels as the dispatcher's CPU kernels of the mas_kernels:: ops.
//
// Python defines the ops (mas_kernels/ops/_library.py); mas_kernels/_backend.py
// decides, once at import and again on use_backend(), which backend serves
// each dispatch key. When that is "native" for CPU it calls
// register_cpu_kernels(), which puts these C++ kernels on the CPU key, so a
// CPU call runs no Python at all; unregister_cpu_kernels() takes them off
// again (another backend's kernels then go on the key). These kernels read no
// environment and never call back into Python. Why C++ at all: in a training
// step the Python kernel's own work (no_grad, version bumps, the trip through
// the interpreter) measured ~0.13 ms with a cold cache, as much as the memory
// pass of the penalty on a 0.5M-parameter MLP.
#include <torch/library.h>

#include "guard.h"
#include "ops.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros_like.h>

#include <tuple>
#include <vector>

namespace mas_kernels {

namespace {

// As a PyTorch in-place op does: autograd must see that the tensor changed.
// (Inference tensors have no version counter.)
void bump(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void abs_outer_cpu(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha) {
  {
    at::NoGradGuard no_grad;  // the kernel ends in an addmm_ on omega
    abs_outer_accumulate_(omega, a, b, alpha);
  }
  bump(omega);
}

void abs_bmm_cpu(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha, int64_t memory_budget) {
  {
    at::NoGradGuard no_grad;  // the bmm strategy and T = 1 run ATen ops
    abs_bmm_accumulate_(omega, a, b, alpha, memory_budget);
  }
  bump(omega);
}

void abs_accumulate_cpu(at::TensorList omegas, at::TensorList tensors, double alpha) {
  abs_accumulate_(omegas.vec(), tensors.vec(), alpha);
  for (const auto& o : omegas) bump(o);
}

at::Tensor penalty_grad_cpu(at::TensorList params, at::TensorList anchors, at::TensorList omegas, double lam,
                            at::TensorList grads) {
  at::Tensor value;
  {
    at::NoGradGuard no_grad;
    value = penalty_grad_(params.vec(), anchors.vec(), omegas.vec(), lam, grads.vec());
  }
  for (const auto& g : grads) bump(g);
  return value;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> penalty_cpu(at::TensorList params, at::TensorList anchors,
                                                            at::TensorList omegas, double lam) {
  guard_penalty("penalty", params.vec(), anchors.vec(), omegas.vec(), lam, nullptr);
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) grads.push_back(at::zeros_like(p));
  at::Tensor value = penalty_grad_(params.vec(), anchors.vec(), omegas.vec(), lam, grads);
  return {value, grads};
}

}  // namespace

// The registration, while there is one. Deleting it takes the kernels off the
// key; the one alive at exit is leaked on purpose: the dispatcher it points
// into may already be gone during the process's static destruction.
torch::Library* registration = nullptr;

void register_cpu_kernels() {
  if (registration != nullptr) return;
  registration = new torch::Library(torch::Library::IMPL, "mas_kernels", c10::DispatchKey::CPU, __FILE__, __LINE__);
  registration->impl("abs_outer_accumulate_", TORCH_FN(abs_outer_cpu));
  registration->impl("abs_accumulate_", TORCH_FN(abs_accumulate_cpu));
  registration->impl("penalty_grad_", TORCH_FN(penalty_grad_cpu));
  registration->impl("penalty", TORCH_FN(penalty_cpu));
  registration->impl("abs_bmm_accumulate_", TORCH_FN(abs_bmm_cpu));
}

void unregister_cpu_kernels() {
  delete registration;
  registration = nullptr;
}

}  // namespace mas_kernels
