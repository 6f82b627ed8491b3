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
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace mas_kernels {

// Elements per work item. Large enough that scheduling one costs nothing next
// to streaming it (32K fp32 elements = 128 KiB per tensor read), small enough
// that a ResNet-50's 25M elements give ~800 items to balance over threads.
constexpr int64_t kChunk = int64_t(1) << 15;

// Parallel only from this many chunks (64K elements) on: below, waking the
// thread team costs more than it saves.
constexpr int64_t kGrainChunks = 2;

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

// The work list: all tensors laid end to end as one flat range of `total`
// elements, cut into chunks of kChunk. A chunk may hold the tail of one tensor
// and many small ones after it, so a list of 161 tensors of very different
// sizes splits into equal pieces of work; and the chunks do not depend on the
// thread count, so neither does a reduction that keeps one slot per chunk.
struct WorkList {
  std::vector<int64_t> offsets;  // offsets[i]: where tensor i starts; offsets.back() == total
  int64_t total = 0;
  int64_t n_chunks = 0;

  explicit WorkList(const std::vector<Prepared>& prepared);

  // Calls f(i, begin, end) for each piece [begin, end) of tensor i (indices
  // within the tensor) that chunk c covers, in order.
  template <typename F>
  void for_each_piece(int64_t c, F&& f) const {
    int64_t b = c * kChunk;
    const int64_t e = std::min(total, b + kChunk);
    // The last tensor starting at or before b (empty tensors start where the next one does).
    auto i = static_cast<int64_t>(std::upper_bound(offsets.begin(), offsets.end(), b) - offsets.begin()) - 1;
    while (b < e) {
      const int64_t piece_end = std::min(e, offsets[i + 1]);
      if (piece_end > b) f(i, b - offsets[i], piece_end - offsets[i]);
      b = piece_end;
      ++i;
    }
  }
};

// f(c0, c1) over ranges of chunk indices [0, n_chunks), on torch's intra-op
// threads. at::parallel_for and not a raw `omp parallel for`: it runs on the
// OpenMP team that torch's own kernels use, in the same way (thread count from
// torch.set_num_threads, serial inside an enclosing parallel region). Raw
// `omp parallel for schedule(dynamic)` regions alternating with torch's were
// measured stalling for whole scheduler time slices on a busy 2-core machine.
template <typename F>
void parallel_chunks(int64_t n_chunks, F&& f) {
  at::parallel_for(0, n_chunks, kGrainChunks, std::forward<F>(f));
}

template <typename F>
void parallel_chunks(const WorkList& work, F&& f) {
  parallel_chunks(work.n_chunks, std::forward<F>(f));
}

// True when processing all tensors at once could race or differ from doing
// them one after another: some output's memory overlaps another output, or an
// input of a different list position. `ins[k][i]` is input k of tensor i.
// (An input that is exactly its own output, same pointer and strides, is
// fine: each element is read before it is written, by the same thread.)
bool cross_tensor_hazard(const std::vector<at::Tensor>& outs,
                         const std::vector<std::vector<at::Tensor>>& ins);

}  // namespace mas_kernels
