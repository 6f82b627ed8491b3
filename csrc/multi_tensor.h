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
#include <cmath>
#include <cstdint>
#include <cstring>
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

// The hot loops are compiled twice, for x86-64-v3 (AVX2, FMA, F16C: any x86
// server CPU since 2013) and for the x86-64 baseline (SSE2), and the loader
// picks one at run time (GCC function multiversioning, an ifunc): fast where
// the CPU allows, runs everywhere, no -march=native. Entry points carry
// MAS_KERNELS_CLONES; what they call is forced inline so it is compiled into
// each clone. Other compilers and targets get the baseline build only.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define MAS_KERNELS_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MAS_KERNELS_CLONES
#endif
#if defined(__GNUC__)
#define MAS_KERNELS_INLINE inline __attribute__((always_inline))
#else
#define MAS_KERNELS_INLINE inline
#endif

// Conversions to and from fp32, written so that GCC vectorises the loops that
// use them (c10's scalar Half conversions are not vectorised without -mf16c,
// which made fp16 ~10x slower than fp32). Bit-exact with PyTorch's: fp16 is
// the FP16 library's algorithm that c10 uses, with its branches turned into
// masks; both round to nearest even, NaN stays NaN.
namespace detail {

MAS_KERNELS_INLINE float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MAS_KERNELS_INLINE uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

MAS_KERNELS_INLINE float half_to_f32(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t small = 0u - uint32_t(two_w < (1u << 27));  // all ones for zero and subnormals
  return f32_from_bits(sign | (small & f32_to_bits(denormalized)) | (~small & f32_to_bits(normalized)));
}

MAS_KERNELS_INLINE uint16_t f32_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t nan = 0u - uint32_t(shl1_w > 0xFF000000u);
  return static_cast<uint16_t>((sign >> 16) | (nan & 0x7E00u) | (~nan & nonsign));
}

MAS_KERNELS_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - uint32_t(f != f);
  return static_cast<uint16_t>((nan & 0x7FC0u) | (~nan & rounded));
}

}  // namespace detail

MAS_KERNELS_INLINE float load_f32(float x) { return x; }
MAS_KERNELS_INLINE float load_f32(at::BFloat16 x) { return detail::f32_from_bits(uint32_t(x.x) << 16); }
MAS_KERNELS_INLINE float load_f32(at::Half x) { return detail::half_to_f32(x.x); }

template <typename T>
inline T store_as(float x);
template <>
MAS_KERNELS_INLINE float store_as<float>(float x) {
  return x;
}
template <>
MAS_KERNELS_INLINE at::BFloat16 store_as<at::BFloat16>(float x) {
  return at::BFloat16(detail::f32_to_bf16(x), at::BFloat16::from_bits());
}
template <>
MAS_KERNELS_INLINE at::Half store_as<at::Half>(float x) {
  return at::Half(detail::f32_to_half(x), at::Half::from_bits());
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
  explicit WorkList(const std::vector<int64_t>& numels);  // tensor i has numels[i] elements

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

// The checks every kernel makes before its first write, the same as the
// Python kernels' guards (mas_kernels/ops/_checks.py), raising ValueError:
// `out` can be written in place element by element (no inference tensor
// outside inference mode, no two elements sharing memory), and a scalar is
// finite with `scale * x` within float32's range.
void check_writable(const at::Tensor& out, const char* op, const char* arg, int64_t index = -1);
void check_scalar(double x, double scale, const char* op, const char* arg);

// Whether the memory ranges of x and y overlap (conservative: interleaved views count).
bool shares_memory(const at::Tensor& x, const at::Tensor& y);

// ``run(T{})`` with T the C++ type of x's dtype (float32, bfloat16 or float16), else an error naming ``op``.
template <typename Run>
void on_16_or_32_bit(const at::Tensor& x, const char* op, Run&& run) {
  switch (x.scalar_type()) {
    case at::kFloat:
      run(float{});
      break;
    case at::kBFloat16:
      run(at::BFloat16{});
      break;
    case at::kHalf:
      run(at::Half{});
      break;
    default:
      TORCH_CHECK(false, op, ": x must be float32/bfloat16/float16, got ", x.scalar_type());
  }
}

}  // namespace mas_kernels
