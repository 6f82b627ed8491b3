// The ops' guards in C++: what every native kernel checks before its first
// write, the same checks and messages as the Python guard of each op
// (mas_kernels/ops/*.py guard(), helpers in ops/_checks.py), raising
// ValueError naming the op, the argument and the index:
//
// * list lengths; each tensor's dtype, shape (against its entry's param or
//   omega, or the op's dims) and device;
// * scalars finite with `scale * x` within float32's range (the kernels
//   compute in float32), the accumulations' alpha >= 0, memory_budget at least
//   kMinMemoryBudget;
// * outputs: not requiring grad under grad mode, no inference tensor outside
//   inference mode, no two elements at one address (a stride-0 or expanded
//   view, an overlapping as_strided view);
// * no output sharing memory with an input or another output, but for the
//   same view listed twice (each entry applied in turn) and, for the
//   elementwise ops, an output that is the same view as an input of its own
//   entry.
//
// Why a C++ copy and not the Python guard in front of these kernels: a
// Python call per op is what registering them on the CPU key avoids (see
// dispatch.cpp). tests/test_ops_guard.py makes every refused call on every
// backend, so the two cannot drift apart unnoticed.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace mas_kernels {

// = mas_kernels.ops.abs_bmm.MIN_MEMORY_BUDGET (a test compares them).
constexpr int64_t kMinMemoryBudget = int64_t(64) << 10;

// penalty_grad_ (grads given) and penalty (grads == nullptr: nothing written). The
// list guards return whether an output is listed more than once (then the
// kernel applies the entries one after another, as the PyTorch path does).
bool guard_penalty(const char* op, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                   const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>* grads);

bool guard_abs_accumulate(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors,
                          double alpha);

// abs_outer_accumulate_ (2-D a and b) and abs_bmm_accumulate_ (3-D; memory_budget checked).
void guard_abs_outer(const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha);
void guard_abs_bmm(const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha,
                   int64_t memory_budget);

// The address checks of ops/_checks.py, for its Python guard (bindings.cpp):
// the same functions the guards above use. An output listed twice as the same
// view makes check_no_overlap return true.
struct Named {
  const char* arg;
  const std::vector<at::Tensor>* ts;
};
bool overlaps_itself(const at::Tensor& t);
bool check_no_overlap(const char* op, const char* out_arg, const std::vector<at::Tensor>& outs,
                      const std::vector<Named>& ins, bool elementwise, bool indexed);
void check_no_overlap_py(const std::string& op, const std::string& out_arg, const std::vector<at::Tensor>& outs,
                         const std::vector<std::string>& in_args, const std::vector<std::vector<at::Tensor>>& ins,
                         bool elementwise, bool indexed);

}  // namespace mas_kernels
