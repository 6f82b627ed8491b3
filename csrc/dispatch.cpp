// The native kernels as the dispatcher's CPU kernels of the mas_kernels:: ops.
//
// Python defines the ops (mas_kernels/ops/_library.py) with one Python kernel
// for every device. When this module loads and matches the running torch,
// Python calls register_cpu_kernels(), which puts these C++ kernels on the CPU
// dispatch key, so a CPU call runs no Python at all. Why: in a training step
// the Python kernel's own work (choosing the backend, no_grad, version bumps,
// the trip through the interpreter) measured ~0.13 ms with a cold cache, as
// much as the memory pass of the penalty on a 0.5M-parameter MLP.
//
// The backend choice stays what mas_kernels/_backend.py documents:
// MAS_KERNELS_BACKEND is read on every call; auto (or unset) and native run
// the C++ kernel here, anything else (torch, triton: the interpreter, or an
// invalid value, which Python reports) calls the op's Python kernel.
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include "ops.h"

#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros_like.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

namespace mas_kernels {

namespace py = pybind11;

namespace {

// The Python kernels (the ``run`` closures of _library.define), kept for the
// life of the process: the dispatcher holds these registrations until exit.
struct Fallbacks {
  py::object abs_outer, abs_accumulate, penalty_grad, penalty;
};
Fallbacks* fallbacks = nullptr;

bool native_selected() {
  const char* raw = std::getenv("MAS_KERNELS_BACKEND");
  if (raw == nullptr) return true;
  std::string v(raw);
  v.erase(std::remove_if(v.begin(), v.end(), [](unsigned char c) { return std::isspace(c); }), v.end());
  std::transform(v.begin(), v.end(), v.begin(), [](unsigned char c) { return std::tolower(c); });
  return v.empty() || v == "auto" || v == "native";
}

// As a PyTorch in-place op does: autograd must see that the tensor changed.
// (Inference tensors have no version counter.)
void bump(const at::Tensor& t) {
  if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

void abs_outer_cpu(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (!native_selected()) {
    py::gil_scoped_acquire gil;
    fallbacks->abs_outer(omega, a, b, alpha);
    return;
  }
  {
    at::NoGradGuard no_grad;  // the kernel ends in an addmm_ on omega
    abs_outer_accumulate_(omega, a, b, alpha);
  }
  bump(omega);
}

void abs_accumulate_cpu(at::TensorList omegas, at::TensorList tensors, double alpha) {
  if (!native_selected()) {
    py::gil_scoped_acquire gil;
    fallbacks->abs_accumulate(omegas.vec(), tensors.vec(), alpha);
    return;
  }
  abs_accumulate_(omegas.vec(), tensors.vec(), alpha);
  for (const auto& o : omegas) bump(o);
}

at::Tensor penalty_grad_cpu(at::TensorList params, at::TensorList anchors, at::TensorList omegas, double lam,
                            at::TensorList grads) {
  if (!native_selected()) {
    py::gil_scoped_acquire gil;
    return fallbacks->penalty_grad(params.vec(), anchors.vec(), omegas.vec(), lam, grads.vec()).cast<at::Tensor>();
  }
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
  if (!native_selected()) {
    py::gil_scoped_acquire gil;
    return fallbacks->penalty(params.vec(), anchors.vec(), omegas.vec(), lam)
        .cast<std::tuple<at::Tensor, std::vector<at::Tensor>>>();
  }
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  grads.reserve(params.size());
  for (const auto& p : params) grads.push_back(at::zeros_like(p));
  at::Tensor value = penalty_grad_(params.vec(), anchors.vec(), omegas.vec(), lam, grads);
  return {value, grads};
}

}  // namespace

void register_cpu_kernels(py::object abs_outer, py::object abs_accumulate, py::object penalty_grad,
                          py::object penalty) {
  TORCH_CHECK(fallbacks == nullptr, "mas_kernels: the native CPU kernels are already registered");
  // Leaked on purpose, like the registrations: they must outlive the interpreter's teardown.
  fallbacks = new Fallbacks{std::move(abs_outer), std::move(abs_accumulate), std::move(penalty_grad),
                            std::move(penalty)};
  auto* lib = new torch::Library(torch::Library::IMPL, "mas_kernels", c10::DispatchKey::CPU, __FILE__, __LINE__);
  lib->impl("abs_outer_accumulate_", TORCH_FN(abs_outer_cpu));
  lib->impl("abs_accumulate_", TORCH_FN(abs_accumulate_cpu));
  lib->impl("penalty_grad_", TORCH_FN(penalty_grad_cpu));
  lib->impl("penalty", TORCH_FN(penalty_cpu));
}

}  // namespace mas_kernels
