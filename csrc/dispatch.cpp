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

at::Tensor adam_penalty_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                 at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                 at::TensorList state_steps, at::TensorList anchors, at::TensorList omegas, double lam,
                                 double lr, double beta1, double beta2, double eps, double weight_decay,
                                 bool decoupled_weight_decay, bool maximize) {
  at::Tensor value;
  {
    at::NoGradGuard no_grad;  // scratch copies of strided outputs are copied back with ATen ops
    value = adam_penalty_step_(params.vec(), grads.vec(), exp_avgs.vec(), exp_avg_sqs.vec(), max_exp_avg_sqs.vec(),
                               state_steps.vec(), anchors.vec(), omegas.vec(), lam, lr, beta1, beta2, eps,
                               weight_decay, decoupled_weight_decay, maximize);
  }
  for (const auto& list : {params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps}) {
    for (const auto& t : list) bump(t);
  }
  return value;
}

at::Tensor sgd_penalty_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                at::TensorList anchors, at::TensorList omegas, double lam, double lr,
                                double weight_decay, double momentum, double dampening, bool nesterov, bool maximize,
                                bool first_step) {
  at::Tensor value;
  {
    at::NoGradGuard no_grad;
    value = sgd_penalty_step_(params.vec(), grads.vec(), momentum_buffers.vec(), anchors.vec(), omegas.vec(), lam, lr,
                              weight_decay, momentum, dampening, nesterov, maximize, first_step);
  }
  for (const auto& list : {params, momentum_buffers}) {
    for (const auto& t : list) bump(t);
  }
  return value;
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
  registration->impl("adam_penalty_step_", TORCH_FN(adam_penalty_step_cpu));
  registration->impl("sgd_penalty_step_", TORCH_FN(sgd_penalty_step_cpu));
}

void unregister_cpu_kernels() {
  delete registration;
  registration = nullptr;
}

}  // namespace mas_kernels
