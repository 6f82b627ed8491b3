#include "multi_tensor.h"

#include <ATen/MemoryOverlap.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>

namespace mas_kernels {

namespace {

// Byte range [first, last) that a tensor's elements occupy (strides are >= 0
// in PyTorch, so data_ptr() is the lowest address).
struct Span {
  uintptr_t first;
  uintptr_t last;
  int64_t index;
};

Span span_of(const at::Tensor& t, int64_t index) {
  auto first = reinterpret_cast<uintptr_t>(t.data_ptr());
  int64_t extent = 1;  // in elements: 1 + sum (size - 1) * stride
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  return {first, first + static_cast<uintptr_t>(extent * t.element_size()), index};
}

bool overlaps(const Span& x, const Span& y) { return x.first < y.last && y.first < x.last; }

bool same_view(const at::Tensor& x, const at::Tensor& y) {
  return x.data_ptr() == y.data_ptr() && x.strides() == y.strides() && x.dtype() == y.dtype();
}

}  // namespace

Prepared prepare(const at::Tensor& out, const std::vector<at::Tensor>& ins) {
  Prepared p;
  p.out = out;
  if (out.is_non_overlapping_and_dense()) {
    p.work = out;
  } else {
    p.work = out.contiguous();
    p.copy_back = true;
  }
  const bool empty = p.work.numel() == 0;
  const Span work_span = empty ? Span{0, 0, 0} : span_of(p.work, 0);
  p.ins.reserve(ins.size());
  for (const auto& x : ins) {
    bool relayout = x.strides() != p.work.strides();
    // An input sharing memory with the output but not element for element
    // would be read after other threads wrote it: read a copy instead.
    if (!relayout && !empty && !same_view(x, p.work) && overlaps(span_of(x, 0), work_span)) relayout = true;
    // empty_like keeps the strides of a non-overlapping, dense tensor.
    p.ins.push_back(relayout ? at::empty_like(p.work, x.options()).copy_(x) : x);
  }
  return p;
}

void finish(std::vector<Prepared>& prepared) {
  for (auto& p : prepared) {
    if (p.copy_back) p.out.copy_(p.work);
  }
}

WorkList::WorkList(const std::vector<Prepared>& prepared) {
  offsets.reserve(prepared.size() + 1);
  offsets.push_back(0);
  for (const auto& p : prepared) offsets.push_back(offsets.back() + p.work.numel());
  total = offsets.back();
  n_chunks = (total + kChunk - 1) / kChunk;
}

WorkList::WorkList(const std::vector<int64_t>& numels) {
  offsets.reserve(numels.size() + 1);
  offsets.push_back(0);
  for (int64_t n : numels) offsets.push_back(offsets.back() + n);
  total = offsets.back();
  n_chunks = (total + kChunk - 1) / kChunk;
}

bool cross_tensor_hazard(const std::vector<at::Tensor>& outs,
                         const std::vector<std::vector<at::Tensor>>& ins) {
  std::vector<Span> out_spans;
  out_spans.reserve(outs.size());
  for (size_t i = 0; i < outs.size(); ++i) {
    if (outs[i].numel() > 0) out_spans.push_back(span_of(outs[i], static_cast<int64_t>(i)));
  }
  std::sort(out_spans.begin(), out_spans.end(), [](const Span& x, const Span& y) { return x.first < y.first; });
  // Sorted by start, two spans overlap only if some neighbours do.
  for (size_t k = 1; k < out_spans.size(); ++k) {
    if (overlaps(out_spans[k - 1], out_spans[k])) return true;
  }
  // Outputs are now disjoint and sorted, so their ends increase too: the
  // outputs overlapping an input are the run ending at the last one that
  // starts before the input ends.
  for (const auto& list : ins) {
    for (size_t i = 0; i < list.size(); ++i) {
      if (list[i].numel() == 0) continue;
      const Span s = span_of(list[i], static_cast<int64_t>(i));
      auto it = std::upper_bound(out_spans.begin(), out_spans.end(), s.last,
                                 [](uintptr_t v, const Span& o) { return v <= o.first; });
      while (it != out_spans.begin()) {
        --it;
        if (it->last <= s.first) break;
        if (it->index != s.index) return true;
      }
    }
  }
  return false;
}

namespace {

std::string arg_name(const char* arg, int64_t index) {
  return index < 0 ? std::string(arg) : std::string(arg) + "[" + std::to_string(index) + "]";
}

}  // namespace

void check_writable(const at::Tensor& out, const char* op, const char* arg, int64_t index) {
  TORCH_CHECK_VALUE(!out.is_inference() || c10::InferenceMode::is_enabled(), "mas_kernels ", op, ": ",
                    arg_name(arg, index), " is an inference tensor (made under torch.inference_mode()), which PyTorch ",
                    "does not let anything update in place outside inference mode; call the op inside ",
                    "torch.inference_mode(), or pass a normal tensor");
  TORCH_CHECK_VALUE(out.is_contiguous() || at::has_internal_overlap(out) != at::MemOverlap::Yes, "mas_kernels ", op,
                    ": ", arg_name(arg, index), " has elements that share memory (an expanded or stride-0 view), ",
                    "so the in-place update would write them more than once; pass a contiguous tensor");
}

void check_scalar(double x, double scale, const char* op, const char* arg) {
  const double limit = static_cast<double>(std::numeric_limits<float>::max());
  TORCH_CHECK_VALUE(std::isfinite(x) && std::fabs(x) * scale <= limit, "mas_kernels ", op, ": ", arg, "=", x,
                    " must be finite and at most ", limit / scale, " in magnitude (the kernels compute in float32)");
}

bool shares_memory(const at::Tensor& x, const at::Tensor& y) {
  if (x.numel() == 0 || y.numel() == 0) return false;
  return overlaps(span_of(x, 0), span_of(y, 0));
}

}  // namespace mas_kernels
