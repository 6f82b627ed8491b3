// The ops' guards in C++ (see guard.h): the Python guards' checks, in the same
// order, with the same messages.
#include "guard.h"

#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>

namespace mas_kernels {

namespace {

// Up to this many elements the interleaving of two tensors is decided by
// their element addresses; beyond it an interleaving counts as an overlap
// (ops/_checks.py EXACT_LIMIT).
constexpr int64_t kExactLimit = int64_t(1) << 24;

// ops/_checks.py _name: arg, arg[index], or the pattern arg with "{}" replaced by the index.
std::string name_of(const char* arg, int64_t index) {
  std::string name(arg);
  if (index < 0) return name;
  const auto at = name.find("{}");
  if (at != std::string::npos) return name.replace(at, 2, std::to_string(index));
  return name + "[" + std::to_string(index) + "]";
}

// Python's spelling of a dtype ("torch.float32"), as the Python guard's messages have it.
std::string py_dtype(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(s);
  }
}

std::string shape_of(const at::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) out << t.size(d) << (t.dim() == 1 ? "," : d + 1 < t.dim() ? ", " : "");
  out << ")";
  return out.str();
}

std::string strides_of(const at::Tensor& t) {
  std::ostringstream out;
  out << "(";
  for (int64_t d = 0; d < t.dim(); ++d) out << t.stride(d) << (t.dim() == 1 ? "," : d + 1 < t.dim() ? ", " : "");
  out << ")";
  return out.str();
}

bool is_float(at::ScalarType s) {
  return s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble;
}

bool is_acc(at::ScalarType s) { return s == at::kFloat || s == at::kDouble; }

void check_dtype(const char* op, const at::Tensor& t, const char* arg, int64_t index, bool acc) {
  TORCH_CHECK_VALUE(acc ? is_acc(t.scalar_type()) : is_float(t.scalar_type()), op, ": ", name_of(arg, index),
                    " has dtype ", py_dtype(t.scalar_type()), ", expected ",
                    acc ? "float32/float64" : "float32/float16/bfloat16/float64");
}

// ops/_checks.py check_like: t has ref's shape and device.
void check_like(const char* op, const at::Tensor& t, const char* arg, const at::Tensor& ref, const char* ref_arg,
                int64_t index) {
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), op, ": ", name_of(arg, index), " has shape ", shape_of(t), " but ",
                    name_of(ref_arg, index), " has shape ", shape_of(ref));
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name_of(arg, index), " is on ", t.device(), " but ",
                    name_of(ref_arg, index), " is on ", ref.device());
}

void check_length(const char* op, const std::vector<at::Tensor>& xs, const char* arg, size_t n, const char* ref) {
  TORCH_CHECK_VALUE(xs.size() == n, op, ": ", arg, " has ", xs.size(), " tensors but ", ref, " has ", n);
}

// ops/_checks.py check_scalar.
void check_scalar(const char* op, const char* arg, double x, double scale, bool nonnegative) {
  const double limit = static_cast<double>(std::numeric_limits<float>::max());
  if (!std::isfinite(x)) {
    TORCH_CHECK_VALUE(false, op, ": ", arg, "=", x, " must be finite (the kernels compute in float32); pass a "
                      "smaller ", arg);
  }
  TORCH_CHECK_VALUE(std::fabs(x) * scale <= limit, op, ": ", arg, "=", x, " must be at most ", limit / scale,
                    " in magnitude (the kernels compute in float32); pass a smaller ", arg);
  TORCH_CHECK_VALUE(!nonnegative || x >= 0, op, ": ", arg, "=", x, " must be >= 0: the op accumulates importance, "
                    "a sum of terms >= 0, which a negative ", arg, " would make shrink or turn negative");
}

void check_not_requiring_grad(const char* op, const at::Tensor& t, const char* arg, int64_t index) {
  TORCH_CHECK_VALUE(!(at::GradMode::is_enabled() && t.requires_grad()), op, ": ", name_of(arg, index),
                    " requires grad, but the op writes into it in place and is not differentiable; pass detached "
                    "tensors or call it under torch.no_grad()");
}

bool is_meta(const at::Tensor& t) { return t.device().is_meta(); }

// The byte address of every element of t (non-empty).
std::vector<int64_t> addresses(const at::Tensor& t) {
  std::vector<int64_t> out{reinterpret_cast<int64_t>(t.data_ptr())};
  const int64_t item = static_cast<int64_t>(t.element_size());
  for (int64_t d = 0; d < t.dim(); ++d) {
    std::vector<int64_t> next;
    next.reserve(out.size() * static_cast<size_t>(t.size(d)));
    for (int64_t base : out)
      for (int64_t k = 0; k < t.size(d); ++k) next.push_back(base + k * t.stride(d) * item);
    out.swap(next);
  }
  return out;
}

}  // namespace

// ops/_checks.py overlaps_itself: whether two elements of t share memory.
bool overlaps_itself(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_contiguous() || is_meta(t)) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;
  bool clear = true;
  for (const auto& [stride, size] : dims) {
    if (stride < extent) {
      clear = false;  // the dims so far do not clear each other: test the addresses
      break;
    }
    extent += stride * (size - 1);
  }
  if (clear) return false;
  if (dims.front().first == 0 || t.numel() > kExactLimit) return true;
  std::vector<int64_t> a = addresses(t);
  std::sort(a.begin(), a.end());
  return std::adjacent_find(a.begin(), a.end()) != a.end();
}

namespace {

// ops/_checks.py check_output: t can be written in place element by element.
void check_output(const char* op, const at::Tensor& t, const char* arg, int64_t index) {
  const std::string name = name_of(arg, index);
  TORCH_CHECK_VALUE(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": ", name,
                    " is an inference tensor (made under torch.inference_mode()), which PyTorch does not let "
                    "anything update in place outside inference mode; call the op inside torch.inference_mode(), "
                    "or pass a normal tensor (", name, ".clone() outside it)");
  TORCH_CHECK_VALUE(!overlaps_itself(t), op, ": ", name, " has elements that share memory (an expanded, stride-0 or "
                    "overlapping as_strided view: shape ", shape_of(t), ", strides ", strides_of(t), "), so the "
                    "in-place update would write them more than once; pass ", name, ".contiguous() (or clone()) "
                    "and copy the result back");
}

struct Span {
  int64_t first, last;  // byte range [first, last)
  int64_t index;        // list position
  const at::Tensor* t;
};

Span span_of(const at::Tensor& t, int64_t index) {
  const auto first = reinterpret_cast<int64_t>(t.data_ptr());
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return {first, first + extent * static_cast<int64_t>(t.element_size()), index, &t};
}

bool same_view(const at::Tensor& x, const at::Tensor& y) {
  return x.data_ptr() == y.data_ptr() && x.scalar_type() == y.scalar_type() && x.sizes() == y.sizes() &&
         x.strides() == y.strides();
}

// ops/_checks.py _share_elements: whether some byte of an element of x is a byte of an element of y.
bool share_elements(const at::Tensor& x, const at::Tensor& y) {
  if (x.numel() + y.numel() > kExactLimit) return true;
  std::vector<int64_t> xs = addresses(x);
  std::sort(xs.begin(), xs.end());
  const int64_t xi = static_cast<int64_t>(x.element_size()), yi = static_cast<int64_t>(y.element_size());
  for (int64_t b : addresses(y)) {
    // The last element of x starting before y's element ends overlaps it iff it ends after y's starts.
    auto it = std::lower_bound(xs.begin(), xs.end(), b + yi);
    if (it != xs.begin() && *std::prev(it) + xi > b) return true;
  }
  return false;
}

}  // namespace

bool check_no_overlap(const char* op, const char* out_arg, const std::vector<at::Tensor>& outs,
                      const std::vector<Named>& ins, bool elementwise, bool indexed) {
  auto name = [indexed](const char* arg, int64_t i) { return name_of(arg, indexed ? i : -1); };
  std::vector<Span> spans;
  for (size_t i = 0; i < outs.size(); ++i)
    if (outs[i].numel() > 0 && !is_meta(outs[i])) spans.push_back(span_of(outs[i], static_cast<int64_t>(i)));
  if (spans.empty()) return false;
  bool repeated = false;
  std::sort(spans.begin(), spans.end(),
            [](const Span& x, const Span& y) { return std::tie(x.first, x.last) < std::tie(y.first, y.last); });
  std::vector<const Span*> active;
  for (const Span& e : spans) {
    active.erase(std::remove_if(active.begin(), active.end(), [&](const Span* a) { return a->last <= e.first; }),
                 active.end());
    for (const Span* a : active) {
      if (same_view(*a->t, *e.t)) {
        repeated = true;
      } else if (share_elements(*a->t, *e.t)) {
        const int64_t i = std::min(a->index, e.index), j = std::max(a->index, e.index);
        TORCH_CHECK_VALUE(false, op, ": ", name(out_arg, i), " and ", name(out_arg, j), " share memory, so updating "
                          "one changes the other midway; pass separate tensors (the same tensor listed twice is "
                          "fine: it gets both updates, in order)");
      }
    }
    active.push_back(&e);
  }
  std::vector<int64_t> reach(spans.size());  // reach[k]: the highest end among spans[0..k]
  int64_t top = 0;
  for (size_t k = 0; k < spans.size(); ++k) reach[k] = top = std::max(top, spans[k].last);
  for (const Named& in : ins) {
    for (size_t i = 0; i < in.ts->size(); ++i) {
      const at::Tensor& t = (*in.ts)[i];
      if (t.numel() == 0 || is_meta(t)) continue;
      const Span s = span_of(t, static_cast<int64_t>(i));
      // The outputs starting before the input ends, scanned back while one of them may reach into it.
      auto k = static_cast<int64_t>(std::lower_bound(spans.begin(), spans.end(), s.last,
                                                     [](const Span& o, int64_t v) { return o.first < v; }) -
                                    spans.begin()) - 1;
      for (; k >= 0 && reach[k] > s.first; --k) {
        const Span& o = spans[k];
        if (o.last <= s.first || (elementwise && o.index == s.index && same_view(*o.t, t))) continue;
        if (!share_elements(*o.t, t)) continue;
        const std::string out = name(out_arg, o.index), other = name(in.arg, s.index);
        TORCH_CHECK_VALUE(false, op, ": ", out, " shares memory with ", other, ", which the op reads while it writes ",
                          out, "; pass ", other, ".clone()");
      }
    }
  }
  return repeated;
}

void check_no_overlap_py(const std::string& op, const std::string& out_arg, const std::vector<at::Tensor>& outs,
                         const std::vector<std::string>& in_args, const std::vector<std::vector<at::Tensor>>& ins,
                         bool elementwise, bool indexed) {
  TORCH_CHECK(in_args.size() == ins.size(), "check_no_overlap: one name per input list");
  std::vector<Named> named;
  for (size_t k = 0; k < ins.size(); ++k) named.push_back({in_args[k].c_str(), &ins[k]});
  check_no_overlap(op.c_str(), out_arg.c_str(), outs, named, elementwise, indexed);
}

bool guard_penalty(const char* op, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                   const std::vector<at::Tensor>& omegas, double lam, const std::vector<at::Tensor>* grads) {
  const size_t n = params.size();
  check_length(op, anchors, "anchors", n, "params");
  check_length(op, omegas, "omegas", n, "params");
  if (grads != nullptr) check_length(op, *grads, "grads", n, "params");
  for (size_t k = 0; k < n; ++k) {
    const auto i = static_cast<int64_t>(k);
    check_dtype(op, params[k], "params", i, false);
    check_dtype(op, anchors[k], "anchors", i, false);
    check_like(op, anchors[k], "anchors", params[k], "params", i);
    check_dtype(op, omegas[k], "omegas", i, false);
    check_like(op, omegas[k], "omegas", params[k], "params", i);
    if (grads != nullptr) {
      check_dtype(op, (*grads)[k], "grads", i, false);
      check_like(op, (*grads)[k], "grads", params[k], "params", i);
    }
  }
  for (size_t k = 1; k < n; ++k) {
    TORCH_CHECK_VALUE(params[k].device() == params[0].device(), op, ": params[", k, "] is on ", params[k].device(),
                      " but params[0] is on ", params[0].device());
  }
  check_scalar(op, "lam", lam, 2.0, false);
  if (grads == nullptr) return false;
  for (size_t k = 0; k < n; ++k) check_not_requiring_grad(op, (*grads)[k], "grads", static_cast<int64_t>(k));
  for (size_t k = 0; k < n; ++k) check_output(op, (*grads)[k], "grads", static_cast<int64_t>(k));
  return check_no_overlap(op, "grads", *grads, {{"params", &params}, {"anchors", &anchors}, {"omegas", &omegas}},
                          /*elementwise=*/true, /*indexed=*/true);
}

bool guard_abs_accumulate(const std::vector<at::Tensor>& omegas, const std::vector<at::Tensor>& tensors,
                          double alpha) {
  const char* op = "abs_accumulate_";
  check_length(op, tensors, "tensors", omegas.size(), "omegas");
  for (size_t k = 0; k < omegas.size(); ++k) {
    const auto i = static_cast<int64_t>(k);
    check_dtype(op, omegas[k], "omegas", i, true);
    check_dtype(op, tensors[k], "tensors", i, false);
    check_like(op, tensors[k], "tensors", omegas[k], "omegas", i);
  }
  for (size_t k = 1; k < omegas.size(); ++k) {
    TORCH_CHECK_VALUE(omegas[k].device() == omegas[0].device(), op, ": omegas[", k, "] is on ", omegas[k].device(),
                      " but omegas[0] is on ", omegas[0].device());
  }
  for (size_t k = 0; k < omegas.size(); ++k) check_not_requiring_grad(op, omegas[k], "omegas", static_cast<int64_t>(k));
  check_scalar(op, "alpha", alpha, 1.0, true);
  for (size_t k = 0; k < omegas.size(); ++k) check_output(op, omegas[k], "omegas", static_cast<int64_t>(k));
  return check_no_overlap(op, "omegas", omegas, {{"tensors", &tensors}}, /*elementwise=*/true, /*indexed=*/true);
}

namespace {

// abs_outer.py / abs_bmm.py: omega can be written while a and b are read (any shared memory refused).
void check_written(const char* op, const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b) {
  check_output(op, omega, "omega", -1);
  const std::vector<at::Tensor> outs{omega}, as{a}, bs{b};
  check_no_overlap(op, "omega", outs, {{"a", &as}, {"b", &bs}}, /*elementwise=*/false, /*indexed=*/false);
}

void check_devices(const char* op, const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK_VALUE(a.device() == omega.device(), op, ": a is on ", a.device(), " but omega is on ", omega.device());
  TORCH_CHECK_VALUE(b.device() == omega.device(), op, ": b is on ", b.device(), " but omega is on ", omega.device());
}

}  // namespace

void guard_abs_outer(const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha) {
  const char* op = "abs_outer_accumulate_";
  check_dtype(op, omega, "omega", -1, true);
  check_dtype(op, a, "a", -1, false);
  check_dtype(op, b, "b", -1, false);
  TORCH_CHECK_VALUE(omega.dim() == 2 && a.dim() == 2 && b.dim() == 2, op, ": omega, a and b must be 2-D, got omega",
                    shape_of(omega), ", a", shape_of(a), ", b", shape_of(b));
  TORCH_CHECK_VALUE(a.size(0) == b.size(0), op, ": a has ", a.size(0), " rows (samples) but b has ", b.size(0));
  TORCH_CHECK_VALUE(omega.size(0) == a.size(1) && omega.size(1) == b.size(1), op, ": omega has shape ",
                    shape_of(omega), " but a^T @ b has shape (", a.size(1), ", ", b.size(1), ")");
  check_devices(op, omega, a, b);
  check_not_requiring_grad(op, omega, "omega", -1);
  check_scalar(op, "alpha", alpha, 1.0, true);
  check_written(op, omega, a, b);
}

void guard_abs_bmm(const at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, double alpha,
                   int64_t memory_budget) {
  const char* op = "abs_bmm_accumulate_";
  check_dtype(op, omega, "omega", -1, true);
  check_dtype(op, a, "a", -1, false);
  check_dtype(op, b, "b", -1, false);
  TORCH_CHECK_VALUE(omega.dim() == 2, op, ": omega must be 2-D (J, I), got shape ", shape_of(omega));
  TORCH_CHECK_VALUE(a.dim() == 3, op, ": a must be 3-D (S, T, J), got shape ", shape_of(a));
  TORCH_CHECK_VALUE(b.dim() == 3, op, ": b must be 3-D (S, T, I), got shape ", shape_of(b));
  TORCH_CHECK_VALUE(b.size(0) == a.size(0), op, ": b has ", b.size(0), " samples (dim 0) but a has ", a.size(0));
  TORCH_CHECK_VALUE(b.size(1) == a.size(1), op, ": b has ", b.size(1), " positions (dim 1) but a has ", a.size(1));
  TORCH_CHECK_VALUE(omega.size(0) == a.size(2) && omega.size(1) == b.size(2), op, ": omega has shape ",
                    shape_of(omega), " but a_s^T @ b_s has shape (", a.size(2), ", ", b.size(2), ")");
  check_devices(op, omega, a, b);
  check_not_requiring_grad(op, omega, "omega", -1);
  check_scalar(op, "alpha", alpha, 1.0, true);
  TORCH_CHECK_VALUE(memory_budget >= kMinMemoryBudget, op, ": memory_budget=", memory_budget,
                    " bytes is below the minimum ", kMinMemoryBudget, " (", kMinMemoryBudget / 1024,
                    " KiB) the per-sample kernels need; pass a larger budget");
  check_written(op, omega, a, b);
}

}  // namespace mas_kernels
