// abs_bmm_accumulate_: omega += alpha * sum_s |a_s^T b_s|, a (S, T, J), b (S, T, I), fp32 accumulation.
//
// Every sample's (J, I) product is needed before its abs. Two strategies, and
// which one is faster depends on the shape (bmm_min_positions):
//
// * Batched GEMMs by blocks of omega (abs_bmm_by_bmm): per block of 64 rows
//   and chunk of samples (about 1 MiB of products), one BLAS batched GEMM,
//   then omega_block += alpha * sum_s |product| while the products are in L2. Best
//   when T is long (the products' traffic is small next to the GEMM) or the
//   products are small.
// * Register tiles, where products would not fit in cache and T is short: the
//   loops of a GotoBLAS/BLIS GEMM whose reduction (sample, position) is broken
//   at sample boundaries. Work unit = kRowTiles row tiles (kMC rows each) x NC
//   columns of omega x one group of samples; per pack chunk (whole samples
//   while they fit in kTC positions, else kTC positions of one sample) the
//   chunk's b columns are packed once into fp32 panels (NR columns each,
//   position-major, zero-padded; this is also where bf16/fp16 become fp32),
//   then per row tile its a rows (panels of kMR rows), and per (kMR x NR) micro
//   tile and sample C = sum_t a_t^T b_t is computed in registers and |C| added
//   to the unit's accumulator (abs_bmm_tiles.h). Per-sample products never
//   reach memory. A sample whose positions span pack chunks carries C through
//   a buffer. Sample groups exist only to give the threads work when omega has
//   few blocks; their partial sums are added in group order, so the result
//   does not depend on the thread count.
//
// Scratch: per thread, the bmm chunk's products (~1 MiB, kept per thread
// between calls) and fp32 copies of 16-bit inputs, within memory_budget (else
// the tiles run); the tiles'
// per-thread panels and accumulators (at most kTC * (kMC + NC) + 2 *
// kRowTiles * kMC * NC floats, 2.1 MiB with AVX-512; kept per thread between
// calls, since fresh pages on every call cost ~5%) and the groups' partial
// sums, (groups, J, I) floats, within memory_budget.
#include "ops.h"

#include "float64.h"
#include "guard.h"
#include "multi_tensor.h"

#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace mas_kernels {

namespace {

constexpr int64_t kMR = 6;         // rows of a micro tile: 2*kMR accumulators + 2 b vectors + 1 broadcast <= 16 regs
constexpr int64_t kMC = 96;        // rows of a row tile: one a pack chunk (kTC x kMC) stays in L2
constexpr int64_t kRowTiles = 4;   // row tiles per work unit: they share one b pack chunk
constexpr int64_t kNCPanels = 16;  // columns per work unit, in NR-wide panels: 512 with AVX-512
constexpr int64_t kTC = 256;       // (samples x positions) per pack chunk: one b panel (kTC x NR) stays in L1
constexpr int64_t kMinUnits = 16;  // split samples into groups until there are this many work units

// What one call of the tile loops works on: one pack chunk of one work unit.
struct Chunk {
  const float* apack;  // [s][p][t][kMR]: sample s, row panel p, position t
  const float* bpack;  // [s][q][t][NR]: column panel q
  int64_t ns, nt, np, nq;
  float* acc;          // (np*kMR) x ld, ld = the tile's columns rounded up to NR
  float* part;         // the same shape: C of the one sample whose positions span chunks
  int64_t ld;
  bool first, last;    // the chunk holds the samples' first / last positions
};

// Packs columns [c0, c0 + valid) of positions [t0, t0 + nt) of samples
// [s0, s0 + ns) of a (S, T, C) tensor with strides st into `panels` panels.
using PackFn = void (*)(const void* x, const int64_t* st, int64_t s0, int64_t ns, int64_t t0, int64_t nt,
                        int64_t c0, int64_t valid, int64_t panels, float* out);

// One target's entry points; pack functions indexed by input dtype (fp32, bf16, fp16).
struct Kernels {
  int64_t nr;
  void (*run)(const Chunk&);
  PackFn pack_a[3];
  PackFn pack_b[3];
};

// One copy of the tile loops and packing per instruction set, picked at run
// time (as the target_clones of the other kernels, but here the vector width,
// and so the panel width NR = 2 vectors, differs per target): 32 columns with
// AVX-512, 16 with AVX2, 8 with SSE2/NEON.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && defined(__linux__)
#define MAS_KERNELS_ABS_BMM_X86 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace v4 {
#include "abs_bmm_tiles.h"
constexpr Kernels kernels = kernels_of<16>();
}  // namespace v4
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace v3 {
#include "abs_bmm_tiles.h"
constexpr Kernels kernels = kernels_of<8>();
}  // namespace v3
#pragma GCC pop_options
#endif
namespace base {
#include "abs_bmm_tiles.h"
constexpr Kernels kernels = kernels_of<4>();
}  // namespace base

const Kernels& pick_kernels() {
#ifdef MAS_KERNELS_ABS_BMM_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return v4::kernels;
  if (__builtin_cpu_supports("x86-64-v3")) return v3::kernels;
#endif
  return base::kernels;
}

int dtype_index(const at::Tensor& x, const char* name) {
  switch (x.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kBFloat16:
      return 1;
    case at::kHalf:
      return 2;
    default:
      TORCH_CHECK(false, "mas_kernels abs_bmm_accumulate_: ", name, " must be float32/bfloat16/float16, got ",
                  x.scalar_type());
  }
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Which strategy is faster depends on the positions T and on whether one
// sample's product (J*I floats) stays in cache while it is written and read
// back. Measured on the 2-core Xeon (AVX-512), single thread, time / the
// batch weight gradient of the same shape, tiles vs bmm:
//   S=64 T=4 768x768:     3.1 vs 6.5    S=32 T=16 1024x1024:  2.0 vs 2.8
//   S=64 T=16 512x512:    1.8 vs 2.1    S=16 T=49 512x4608:   1.2 vs 1.6
//   S=16 T=128 3072x768:  1.3 vs 1.5    S=16 T=128 1024x1024: 1.3 vs 1.3
//   S=16 T=32 768x768:    2.3 vs 2.0    S=32 T=64 512x512:    1.5 vs 1.4
//   S=64 T=32 128x128:    1.8 vs 1.6    S=16 T=1024 64x576:   1.7 vs 1.1
// (the tiles' packing costs ~0.2-0.7x at every T; the bmm's extra memory
// traffic is large at short T, and more so where products leave the L2).
int64_t bmm_min_positions(int64_t J, int64_t I) {
  return J * I <= (int64_t(1) << 20) ? 32 : 256;
}

// The bmm strategy's work unit: kBmmRows rows of omega (all its columns, or
// a share of them when there are fewer row blocks than threads), and per call
// of BLAS as many samples as make about 1 MiB of products. (Measured single
// thread, time / the bound: 64 rows x all columns 1.05-1.74x, 128 x 128 tiles
// 1.1-1.9x, whole per-sample products 1.05-1.55x but no parallelism.)
constexpr int64_t kBmmRows = 64;
constexpr int64_t kBmmChunkProduct = int64_t(1) << 18;  // floats

struct BmmTiles {
  int64_t rows, cols, tiles_i, tiles;
};

BmmTiles bmm_tiles(int64_t J, int64_t I) {
  const int64_t rows = std::min(J, kBmmRows), row_blocks = (J + rows - 1) / rows;
  const int64_t splits = std::max<int64_t>(1, (at::get_num_threads() + row_blocks - 1) / row_blocks);
  const int64_t cols = std::min(I, round_up((I + splits - 1) / splits, 16));
  const int64_t tiles_i = (I + cols - 1) / cols;
  return {rows, cols, tiles_i, row_blocks * tiles_i};
}

// dst rows (stride ld, unit column stride) += alpha * |src| of ns samples' (jn, in) products, sample after
// sample: the same float operations in the same order as the strided loop, vectorised (the strided loop ran
// scalar, ~1 float per cycle: at T = 32 it took as long as the GEMM's tail).
#ifdef MAS_KERNELS_ABS_BMM_X86
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
MAS_KERNELS_CLONES
#endif
void abs_add_products(const float* src, int64_t ns, int64_t jn, int64_t in, float alpha, float* dst,
                                         int64_t ld) {
  for (int64_t s = 0; s < ns; ++s)
    for (int64_t j = 0; j < jn; ++j) {
      const float* __restrict row = src + (s * jn + j) * in;
      float* __restrict d = dst + j * ld;
#pragma omp simd
      for (int64_t i = 0; i < in; ++i) d[i] += alpha * std::fabs(row[i]);
    }
}

// This thread's buffer of the bmm strategy's products, kept between calls: a fresh ~1 MiB each call came from
// pages the allocator had just given back (one page fault per 4 KiB, as long as the abs pass itself, when the
// exact rule runs its layers one after another between the model's own allocations).
float* bmm_scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

// The bmm strategy: one parallel region over blocks of omega; each thread, for
// its block and a chunk of samples at a time, runs one single-threaded batched
// GEMM of the samples' a-columns^T and b-columns (fp32 copies of 16-bit
// inputs) into its scratch, then adds alpha * |product| into the block, sample
// after sample. A thread owns its block, so nothing races, and the samples are
// added in order (the blocks' column split follows the thread count, so BLAS
// may round the products differently). One region per call, not one per
// chunk: on a loaded 2-core machine each region can wait a scheduler slice for
// a descheduled thread (per-chunk regions measured 2-13x slower there).
void abs_bmm_by_bmm(at::Tensor& omega, const at::Tensor& a, const at::Tensor& b, float alpha, int64_t samples) {
  const int64_t S = a.size(0), J = a.size(2), I = b.size(2);
  const auto [rows, cols, tiles_i, tiles] = bmm_tiles(J, I);
  float* const out = omega.data_ptr<float>();
  const int64_t so0 = omega.stride(0), so1 = omega.stride(1);
  at::parallel_for(0, tiles, 1, [&](int64_t u0, int64_t u1) {
    at::Tensor prod = at::from_blob(bmm_scratch(samples * rows * cols), {samples * rows * cols}, omega.options());
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t j0 = u / tiles_i * rows, i0 = u % tiles_i * cols;
      const int64_t jn = std::min(rows, J - j0), in = std::min(cols, I - i0);
      const at::Tensor a_cols = a.narrow(2, j0, jn), b_cols = b.narrow(2, i0, in);
      for (int64_t s0 = 0; s0 < S; s0 += samples) {
        const int64_t ns = std::min(samples, S - s0);
        at::Tensor p = prod.narrow(0, 0, ns * jn * in).view({ns, jn, in});
        at::bmm_out(p, a_cols.narrow(0, s0, ns).to(at::kFloat).transpose(1, 2),
                    b_cols.narrow(0, s0, ns).to(at::kFloat));
        const float* const src = p.const_data_ptr<float>();
        if (so1 == 1) {
          abs_add_products(src, ns, jn, in, alpha, out + j0 * so0 + i0, so0);
        } else {
          for (int64_t s = 0; s < ns; ++s)
            for (int64_t j = 0; j < jn; ++j) {
              const float* row = src + (s * jn + j) * in;
              float* dst = out + (j0 + j) * so0 + i0 * so1;
              for (int64_t i = 0; i < in; ++i) dst[i * so1] += alpha * std::fabs(row[i]);
            }
        }
      }
    }
  });
}

// This thread's scratch, kept between calls.
float* thread_scratch(int64_t floats) {
  thread_local std::vector<float> buffer;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

}  // namespace

int64_t abs_bmm_bmm_chunk(int64_t S, int64_t T, int64_t J, int64_t I, int64_t memory_budget) {
  if (S == 0 || T <= 1 || J * I == 0 || T < bmm_min_positions(J, I)) return 0;
  const BmmTiles t = bmm_tiles(J, I);
  // Scratch per sample and thread: fp32 copies of its a and b columns (none for
  // fp32, counted anyway) and its product block.
  const int64_t per_sample = int64_t(sizeof(float)) * (T * (t.rows + t.cols) + t.rows * t.cols);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), t.tiles);
  // 0 when one sample per thread is over the budget: then the tiles run, which need none of it.
  return std::min({S, memory_budget / (per_sample * threads), std::max<int64_t>(1, kBmmChunkProduct / (t.rows * t.cols))});
}

void abs_bmm_accumulate_(at::Tensor omega, const at::Tensor& a, const at::Tensor& b, double alpha,
                         int64_t memory_budget) {
  guard_abs_bmm(omega, a, b, alpha, memory_budget);
  TORCH_CHECK(omega.device().is_cpu() && a.device().is_cpu() && b.device().is_cpu(),
              "mas_kernels abs_bmm_accumulate_: the native kernels take CPU tensors");
  const int64_t S = a.size(0), T = a.size(1), J = a.size(2), I = b.size(2);
  if (omega.numel() == 0 || S == 0 || T == 0) return;
  if (omega.scalar_type() == at::kDouble || a.scalar_type() == at::kDouble || b.scalar_type() == at::kDouble) {
    abs_bmm_f64(omega, a, b, alpha, memory_budget);
    return;
  }
  if (T == 1) {
    // |a_s^T b_s| = |a_s|^T |b_s| for one position: the abs-GEMM, at the speed of a plain GEMM.
    abs_outer_accumulate_(omega, a.select(1, 0), b.select(1, 0), alpha);
    return;
  }
  const int64_t bmm_samples = abs_bmm_bmm_chunk(S, T, J, I, memory_budget);
  if (bmm_samples > 0) {
    abs_bmm_by_bmm(omega, a, b, static_cast<float>(alpha), bmm_samples);
    return;
  }
  static const Kernels& k = pick_kernels();
  const int64_t NR = k.nr;
  const PackFn pack_a = k.pack_a[dtype_index(a, "a")], pack_b = k.pack_b[dtype_index(b, "b")];
  const int64_t mc = std::min(kMC, round_up(J, kMR));
  const int64_t rows = kRowTiles * mc;  // rows per work unit
  const int64_t nc = std::min(kNCPanels * NR, round_up(I, NR));
  const int64_t chunk_samples = T <= kTC ? std::max<int64_t>(1, kTC / T) : 1;
  const int64_t chunk_positions = std::min(T, kTC);
  const int64_t blocks_i = (I + nc - 1) / nc, blocks = (J + rows - 1) / rows * blocks_i;
  // Sample groups for the threads on small outputs; each needs a (J, I) partial sum within the budget.
  int64_t groups = std::min(S, (kMinUnits + blocks - 1) / blocks);
  groups = std::max<int64_t>(1, std::min(groups, memory_budget / (int64_t(sizeof(float)) * J * I)));
  at::Tensor partials;
  if (groups > 1) partials = at::empty({groups, J, I}, omega.options());
  float* const partial = groups > 1 ? partials.data_ptr<float>() : nullptr;

  const int64_t sa[3] = {a.stride(0), a.stride(1), a.stride(2)};
  const int64_t sb[3] = {b.stride(0), b.stride(1), b.stride(2)};
  const void* const pa = a.const_data_ptr();
  const void* const pb = b.const_data_ptr();
  float* const out = omega.data_ptr<float>();
  const int64_t so0 = omega.stride(0), so1 = omega.stride(1);
  const float alpha_f = static_cast<float>(alpha);
  const int64_t a_floats = chunk_samples * chunk_positions * mc;
  const int64_t b_floats = chunk_samples * chunk_positions * nc;
  const int64_t acc_floats = std::min(rows, round_up(J, kMR)) * nc;

  at::parallel_for(0, blocks * groups, 1, [&](int64_t u0, int64_t u1) {
    float* const apack = thread_scratch(a_floats + b_floats + (T > kTC ? 2 : 1) * acc_floats);
    float* const bpack = apack + a_floats;
    float* const acc = bpack + b_floats;
    float* const part = T > kTC ? acc + acc_floats : acc;  // only read when positions span chunks
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t g = u / blocks, block = u % blocks;
      const int64_t j_begin = block / blocks_i * rows, i0 = block % blocks_i * nc;
      const int64_t j_end = std::min(J, j_begin + rows), in = std::min(nc, I - i0);
      const int64_t nq = (in + NR - 1) / NR, s_end = (g + 1) * S / groups;
      std::fill(acc, acc + acc_floats, 0.0f);
      for (int64_t s0 = g * S / groups; s0 < s_end; s0 += chunk_samples) {
        const int64_t ns = std::min(chunk_samples, s_end - s0);
        for (int64_t t0 = 0; t0 < T; t0 += chunk_positions) {
          const int64_t nt = std::min(chunk_positions, T - t0);
          pack_b(pb, sb, s0, ns, t0, nt, i0, in, nq, bpack);
          for (int64_t j0 = j_begin; j0 < j_end; j0 += mc) {
            const int64_t jn = std::min(mc, j_end - j0), np = (jn + kMR - 1) / kMR;
            const int64_t off = (j0 - j_begin) * nc;
            pack_a(pa, sa, s0, ns, t0, nt, j0, jn, np, apack);
            k.run(Chunk{apack, bpack, ns, nt, np, nq, acc + off, part + off, nc, t0 == 0, t0 + nt == T});
          }
        }
      }
      for (int64_t j = j_begin; j < j_end; ++j) {
        const float* src = acc + (j - j_begin) * nc;
        if (partial != nullptr) {
          std::memcpy(partial + (g * J + j) * I + i0, src, sizeof(float) * in);
        } else {
          float* dst = out + j * so0 + i0 * so1;
          for (int64_t c = 0; c < in; ++c) dst[c * so1] += alpha_f * src[c];
        }
      }
    }
  });
  if (partial == nullptr) return;
  // The groups' partial sums, added in group order whatever the thread count.
  at::parallel_for(0, J, std::max<int64_t>(1, kChunk / (I * groups)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* dst = out + r * so0;
      for (int64_t c = 0; c < I; ++c) {
        float sum = 0.0f;
        for (int64_t g = 0; g < groups; ++g) sum += partial[(g * J + r) * I + c];
        dst[c * so1] += alpha_f * sum;
      }
    }
  });
}

}  // namespace mas_kernels
