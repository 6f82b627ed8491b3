// Shared machinery of the native CPU kernels: dtype conversion, dense layouts
// and the flat (tensor, chunk) work list that OpenMP threads share.
//
// Every elementwise op here walks each tensor's storage as one flat range of
// numel() elements. That is only valid when the output is non-overlapping and
// dense and every input has exactly the output's strides, so `prepare` makes
// it so: a strided output is computed into a dense scratch copy (copied back
// afterwards) and an input with other strides is copied into the output's
// layout. The common case (everything contiguous, or the same transposed
// layout) copies nothing.
#pragma once

// Per-operator headers, not <ATen/ATen.h>: they cut the build time to a third.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

namespace mas_kernels {

// Elements per work item. Large enough that scheduling one costs nothing next
// to streaming it (32K fp32 elements = 128 KiB per tensor read), small enough
// that a ResNet-50's 25M elements give ~800 items to balance over threads and
// that 161 tensors of very different sizes spread evenly.
constexpr int64_t kChunk = int64_t(1) << 15;

// Below this many elements in total, one thread: waking the OpenMP team costs
// more than it saves.
constexpr int64_t kParallelMin = int64_t(1) << 16;

template <typename T>
inline float load_f32(T x) {
  return static_cast<float>(x);
}

// float -> bf16/fp16 rounds to nearest even (the c10 conversions), as
// PyTorch's own `add_` into a low-precision tensor does.
template <typename T>
inline T store_as(float x) {
  return static_cast<T>(x);
}

// One work item: elements [begin, end) of tensor `index`.
struct Chunk {
  int64_t index;
  int64_t begin;
  int64_t end;
};

// The output of tensor i as the kernels see it, and its inputs in its layout.
struct Prepared {
  at::Tensor out;              // what the caller passed
  at::Tensor work;             // non-overlapping and dense: `out` itself or a scratch copy
  std::vector<at::Tensor> ins; // each with work's sizes and strides
  bool copy_back = false;      // work is a scratch copy: copy it into out at the end
};

// Make `out` and `ins` walkable as flat ranges of the same length (see top).
Prepared prepare(const at::Tensor& out, const std::vector<at::Tensor>& ins);

// Copy scratch outputs back into the caller's tensors.
void finish(std::vector<Prepared>& prepared);

// Split every non-empty tensor into chunks of at most kChunk elements.
std::vector<Chunk> make_chunks(const std::vector<Prepared>& prepared);

// Threads to use for `total` elements (1 when small, or when already inside a
// parallel region: nested OpenMP teams would oversubscribe the cores).
int threads_for(int64_t total);

// True when processing all tensors at once could race or differ from doing
// them one after another: some output's memory overlaps another output, or an
// input of a different list position. `ins[k][i]` is input k of tensor i.
// (An input that is exactly its own output, same pointer and strides, is
// fine: each element is read before it is written, by the same thread.)
bool cross_tensor_hazard(const std::vector<at::Tensor>& outs,
                         const std::vector<std::vector<at::Tensor>>& ins);

}  // namespace mas_kernels
