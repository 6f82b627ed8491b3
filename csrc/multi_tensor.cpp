#include "multi_tensor.h"

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

}  // namespace mas_kernels
