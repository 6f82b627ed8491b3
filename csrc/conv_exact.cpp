// conv_weight_abs_sum_: omega += alpha * sum_k |g_k|, g_k the per-sample weight gradient of a convolution.
//
// For sample k, group g, output channel o of the group and patch element j
// (input channel c of the group and kernel offset q, C-major as in the
// weight): g_k[g, o, j] = sum_l delta[k, g*Og + o, l] * xpad[k, g*Cg + c, pos(l, q)],
// l over the output positions. The abs comes after the sum over positions.
//
// Implicit GEMM per sample: the sample's patch matrix (C*K, L) is gathered
// from the padded input into a per-thread buffer that stays in cache (im2col
// of one sample, or of a few small ones, never of the batch), one BLAS call
// per chunk of samples (batched over samples and groups) gives the per-sample
// products (Og, Cg*K), and |product| goes into the chunk's accumulator while
// it is still in cache. Where the unfolded batch costs K times the input in
// memory traffic (the unfold + abs_bmm strategy), this touches the input
// about once from memory.
//
// Two ways to gather: a run per output row (any shape), or, where the rows
// are wide enough, the shifted-rows layout (see Shifted below): the sample's
// padded input cut into its stride phases once, then each patch row is one
// contiguous copy per output plane, the output gradient widened with zeros
// to the padded row (measured on the small CNN's 3x3 layers, 16 samples:
// 1.4-2.6x -> 1.2-2.0x the batch weight gradient, the narrowest rows gaining
// most).
//
// Threads: the samples are cut into a fixed number of blocks (at most 8,
// fewer where their (G, Og, Cg*K) partial sums would exceed a quarter of the
// budget); each block sums its samples in order into its own partial, and the
// partials are added in block order (with one thread, as each block ends), so
// the result does not depend on the thread count (up to BLAS's own rounding: with one block, for weights too
// large for several partials in the budget, the BLAS calls run multi-threaded
// themselves).
//
// Scratch: the partials (blocks x weight floats) and, per thread, the
// gathered patches and the products of one chunk of samples (about 1 MiB, at
// least one sample; positions are chunked, their products added before the
// abs, when one sample's patches alone would not fit the rest of the budget).
#include "ops.h"

#include "multi_tensor.h"

#include <ATen/Parallel.h>
#include <ATen/ops/baddbmm.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace mas_kernels {

namespace {

constexpr int64_t kMaxBlocks = 8;
constexpr int64_t kChunkFloats = int64_t(1) << 18;  // ~1 MiB of patches + products per chunk of samples

struct Geometry {
  int64_t N, C, O, G, Cg, Og, K, L;
  int64_t in[3], out[3], k[3], s[3], d[3], p[3];  // p: zeros padded before each dim (none after is needed)
};

// A short contiguous run (an output row's worth): a loop the compiler vectorises, cheaper than memcpy's call.
MAS_KERNELS_INLINE void copy_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
}

// copy_run that also says whether a copied value is inf or NaN (an integer test of the exponent bits).
MAS_KERNELS_INLINE uint32_t copy_run_nonfinite(float* __restrict dst, const float* __restrict src, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof bits);
    bad |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
    dst[i] = src[i];
  }
  return bad;
}

// Patches of positions [l0, l0 + nl) of one sample, (C*K, nl) row-major, from xs (C, in0, in1, in2) with
// zeros around it (the padding): input index = output index * stride + offset * dilation - padding.
MAS_KERNELS_CLONES void gather(const Geometry& g, const float* xs, int64_t l0, int64_t nl, float* dst) {
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  for (int64_t c = 0; c < g.C; ++c) {
    const float* xc = xs + c * in_plane;
    for (int64_t q0 = 0; q0 < g.k[0]; ++q0)
      for (int64_t q1 = 0; q1 < g.k[1]; ++q1)
        for (int64_t q2 = 0; q2 < g.k[2]; ++q2) {
          float* row = dst + (((c * g.k[0] + q0) * g.k[1] + q1) * g.k[2] + q2) * nl;
          // Output positions y2 whose input column lies inside: lo2 <= y2 < hi2.
          const int64_t off2 = q2 * g.d[2] - g.p[2], st = g.s[2];
          const int64_t lo2 = off2 >= 0 ? 0 : (-off2 + st - 1) / st;
          const int64_t hi2 = std::max<int64_t>(lo2, g.in[2] - off2 <= 0 ? 0 : (g.in[2] - off2 + st - 1) / st);
          const int64_t end = l0 + nl;
          // The output coordinates of l0, then advanced run by run (no division per run).
          int64_t y2 = l0 % g.out[2], y1 = (l0 / g.out[2]) % g.out[1], y0 = l0 / (g.out[2] * g.out[1]);
          for (int64_t l = l0; l < end;) {
            // One run along the last output dim.
            const int64_t run = std::min(end - l, g.out[2] - y2);
            float* out = row + (l - l0);
            const int64_t i0 = y0 * g.s[0] + q0 * g.d[0] - g.p[0], i1 = y1 * g.s[1] + q1 * g.d[1] - g.p[1];
            if (i0 < 0 || i0 >= g.in[0] || i1 < 0 || i1 >= g.in[1]) {
              std::fill(out, out + run, 0.0f);
            } else {
              const float* src = xc + (i0 * g.in[1] + i1) * g.in[2];  // the input row: src[off2 + y * st]
              const int64_t a = std::clamp(lo2, y2, y2 + run), b = std::clamp(hi2, a, y2 + run);
              std::fill(out, out + (a - y2), 0.0f);
              if (st == 1) {
                if (b > a) copy_run(out + (a - y2), src + off2 + a, b - a);
              } else {
                for (int64_t y = a; y < b; ++y) out[y - y2] = src[off2 + y * st];
              }
              std::fill(out + (b - y2), out + run, 0.0f);
            }
            l += run;
            y2 = 0;
            if (++y1 == g.out[1]) {
              y1 = 0;
              ++y0;
            }
          }
        }
  }
}

MAS_KERNELS_CLONES void add_run(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

MAS_KERNELS_CLONES void abs_add(float* __restrict dst, const float* __restrict src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] += std::fabs(src[i]);
}

// The shifted-rows layout: positions l' = (y0, y1, y2') with y2' running over a widened row of Wp >= out2
// values. The padded input is cut into s1 x s2 phases (phase (a1, a2) holds the padded rows a1, a1 + s1, ...
// and columns a2, a2 + s2, ...): kernel offset q1 * d1 = sh1 * s1 + a1 then reads phase a1 from row y1 + sh1 at
// stride 1 (likewise in the last dim), so with Wp = out2 + the largest shift sh2 the patch row of (c, q) is, for
// each y0, one contiguous slice of a phase (start row sh1, column sh2): a memcpy per (c, q, y0) where the
// gather above walks a run per output row. The positions y2' >= out2 get a zero output gradient (delta is
// widened with zeros), so their products, the wrapped reads into the next row, add nothing; the inputs must
// be finite for that (0 * inf is NaN): a sample with an inf or NaN goes through the gather instead.
struct Shifted {
  int64_t Dp, Hp, Wp, L;  // padded depth read; a phase's rows and columns; the widened positions out0*out1*Wp
  int64_t P = 0;          // phases some kernel offset reads (only those are stored, in order)
  int64_t slot[16][16];   // phase (a1, a2) -> its place among them (strides up to 16; else the gather)
  int64_t phase() const { return Hp * Wp; }
  int64_t xpad(const Geometry& g) const { return g.C * Dp * P * phase() + Wp; }  // + a zero tail
};

bool shifted_of(const Geometry& g, Shifted& h) {
  if (g.s[1] > 16 || g.s[2] > 16) return false;
  h.Dp = (g.out[0] - 1) * g.s[0] + (g.k[0] - 1) * g.d[0] + 1;
  h.Hp = g.out[1] + (g.k[1] - 1) * g.d[1] / g.s[1];
  h.Wp = g.out[2] + (g.k[2] - 1) * g.d[2] / g.s[2];
  h.L = g.out[0] * g.out[1] * h.Wp;
  for (auto& row : h.slot) std::fill(row, row + 16, int64_t(-1));
  for (int64_t q1 = 0; q1 < g.k[1]; ++q1)
    for (int64_t q2 = 0; q2 < g.k[2]; ++q2) {
      int64_t& at = h.slot[q1 * g.d[1] % g.s[1]][q2 * g.d[2] % g.s[2]];
      if (at < 0) at = h.P++;
    }
  return true;
}

// One sample's input (C, in0, in1, in2) into xp (C, Dp, P, Hp, Wp): phase (a1, a2) row u column v holds the
// padded input at (u * s1 + a1, v * s2 + a2), zeros where the padding (or nothing) is; the phases no kernel
// offset reads are not stored. Returns whether every value copied is finite.
MAS_KERNELS_CLONES bool pad_sample(const Geometry& g, const Shifted& h, const float* xs, float* xp) {
  const int64_t in_plane = g.in[0] * g.in[1] * g.in[2];
  uint32_t bad = 0;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t z = 0; z < h.Dp; ++z)
      for (int64_t a1 = 0; a1 < g.s[1]; ++a1)
        for (int64_t a2 = 0; a2 < g.s[2]; ++a2) {
          if (h.slot[a1][a2] < 0) continue;
          float* const ph = xp + ((c * h.Dp + z) * h.P + h.slot[a1][a2]) * h.phase();
          const int64_t iz = z - g.p[0];
          // Columns v whose input column v * s2 + a2 - p2 lies inside: lo <= v < hi.
          const int64_t off = a2 - g.p[2], st = g.s[2];
          const int64_t lo = std::min(h.Wp, off >= 0 ? 0 : (-off + st - 1) / st);
          const int64_t hi = std::clamp<int64_t>(g.in[2] - off <= 0 ? 0 : (g.in[2] - off + st - 1) / st, lo, h.Wp);
          for (int64_t u = 0; u < h.Hp; ++u) {
            float* dst = ph + u * h.Wp;
            const int64_t ir = u * g.s[1] + a1 - g.p[1];
            if (iz < 0 || iz >= g.in[0] || ir < 0 || ir >= g.in[1]) {
              std::fill(dst, dst + h.Wp, 0.0f);
              continue;
            }
            const float* src = xs + c * in_plane + (iz * g.in[1] + ir) * g.in[2] + off;  // src[v * st]
            std::fill(dst, dst + lo, 0.0f);
            if (st == 1) {
              if (hi > lo) bad |= copy_run_nonfinite(dst + lo, src + lo, hi - lo);
            } else {
              for (int64_t v = lo; v < hi; ++v) dst[v] = src[v * st];
              uint32_t bits;
              for (int64_t v = lo; v < hi; ++v) {
                std::memcpy(&bits, dst + v, sizeof bits);
                bad |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
              }
            }
            std::fill(dst + hi, dst + h.Wp, 0.0f);
          }
        }
  std::fill(xp + h.xpad(g) - h.Wp, xp + h.xpad(g), 0.0f);
  return bad == 0;
}

// Patches (C*K, L') of one sample's phases: a contiguous slice per (c, q, y0).
MAS_KERNELS_CLONES void gather_shifted(const Geometry& g, const Shifted& h, const float* xp, float* dst) {
  const int64_t run = g.out[1] * h.Wp;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t q0 = 0; q0 < g.k[0]; ++q0)
      for (int64_t q1 = 0; q1 < g.k[1]; ++q1)
        for (int64_t q2 = 0; q2 < g.k[2]; ++q2) {
          float* row = dst + (((c * g.k[0] + q0) * g.k[1] + q1) * g.k[2] + q2) * h.L;
          const int64_t o1 = q1 * g.d[1], o2 = q2 * g.d[2];
          const int64_t a1 = o1 % g.s[1], a2 = o2 % g.s[2];
          const int64_t start = (o1 / g.s[1]) * h.Wp + o2 / g.s[2];
          for (int64_t y0 = 0; y0 < g.out[0]; ++y0) {
            const int64_t z = y0 * g.s[0] + q0 * g.d[0];
            std::memcpy(row + y0 * run, xp + ((c * h.Dp + z) * h.P + h.slot[a1][a2]) * h.phase() + start,
                        sizeof(float) * run);
          }
        }
}

// One sample's output gradient (O, L) widened to (O, L'): each output row of out2 values, then Wp - out2 zeros.
MAS_KERNELS_CLONES void widen_delta(const Geometry& g, const Shifted& h, const float* ds, float* dst) {
  const int64_t rows = g.O * g.out[0] * g.out[1];
  for (int64_t r = 0; r < rows; ++r) {
    copy_run(dst + r * h.Wp, ds + r * g.out[2], g.out[2]);
    std::fill(dst + r * h.Wp + g.out[2], dst + (r + 1) * h.Wp, 0.0f);
  }
}

// out (G, Og, CgK) += alpha * sum_b partial[b] (each (G, CgK, Og)), for groups [g0, g1).
MAS_KERNELS_CLONES void sum_blocks(float* __restrict out, const float* __restrict partial, int64_t blocks,
                                   int64_t W, int64_t g0, int64_t g1, int64_t og, int64_t cgk, float alpha) {
  for (int64_t gi = g0; gi < g1; ++gi)
    for (int64_t j = 0; j < cgk; ++j)
      for (int64_t o = 0; o < og; ++o) {
        float s = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) s += partial[b * W + (gi * cgk + j) * og + o];
        out[(gi * og + o) * cgk + j] += alpha * s;
      }
}

// Samples [s0, s1) into acc (G*Cg*K*Og floats, each group's (Cg*K, Og) transposed; zeroed by the caller),
// scratch from buf.
void run_samples(const Geometry& g, const float* x, const float* delta, int64_t s0, int64_t s1, int64_t chunk,
                 int64_t positions, float* buf, float* acc) {
  const int64_t CK = g.C * g.K, W = g.Og * g.Cg * g.K * g.G;
  const int64_t x_sample = g.C * g.in[0] * g.in[1] * g.in[2], d_sample = g.O * g.L;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  for (int64_t s = s0; s < s1; s += chunk) {
    const int64_t ns = std::min(chunk, s1 - s);
    float* const prod = buf;
    for (int64_t l0 = 0; l0 < g.L; l0 += positions) {
      const int64_t nl = std::min(positions, g.L - l0);
      float* const patches = buf + ns * W;
      for (int64_t i = 0; i < ns; ++i) gather(g, x + (s + i) * x_sample, l0, nl, patches + i * CK * nl);
      // (ns*G, Cg*K, nl) @ (ns*G, nl, Og): the samples' and groups' products at once, transposed (Cg*K, Og) per
      // group: measured 1.1-2.6x faster than (Og, nl) @ (nl, Cg*K) on the small-channel shapes (BLAS prefers
      // the long side as rows there).
      const at::Tensor p = at::from_blob(patches, {ns * g.G, g.Cg * g.K, nl}, opts);
      const at::Tensor dt = at::from_blob(const_cast<float*>(delta) + s * d_sample + l0, {ns * g.G, nl, g.Og},
                                          {g.Og * g.L, 1, g.L}, opts);
      at::Tensor out = at::from_blob(prod, {ns * g.G, g.Cg * g.K, g.Og}, opts);
      if (l0 == 0) {
        at::bmm_out(out, p, dt);
      } else {
        out.baddbmm_(p, dt);
      }
    }
    for (int64_t i = 0; i < ns; ++i) abs_add(acc, prod + i * W, W);
  }
}

// run_samples in the shifted-rows layout (whole samples: the caller checked that one fits the budget). A sample
// whose input holds an inf or NaN is left out of its chunk's products and summed by run_samples after it.
void run_samples_shifted(const Geometry& g, const Shifted& h, const float* x, const float* delta, int64_t s0,
                         int64_t s1, int64_t chunk, float* buf, float* acc) {
  const int64_t CK = g.C * g.K, W = g.Og * g.Cg * g.K * g.G;
  const int64_t x_sample = g.C * g.in[0] * g.in[1] * g.in[2], d_sample = g.O * g.L;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  float* const xp = buf;
  float* const prod = xp + h.xpad(g);
  std::vector<int64_t> odd;
  for (int64_t s = s0; s < s1; s += chunk) {
    const int64_t ns = std::min(chunk, s1 - s);
    float* const patches = prod + ns * W;
    float* const wide = patches + ns * CK * h.L;
    odd.clear();
    for (int64_t i = 0; i < ns; ++i) {
      if (!pad_sample(g, h, x + (s + i) * x_sample, xp)) {
        odd.push_back(s + i);
        std::fill(patches + i * CK * h.L, patches + (i + 1) * CK * h.L, 0.0f);
        std::fill(wide + i * g.O * h.L, wide + (i + 1) * g.O * h.L, 0.0f);
        continue;
      }
      gather_shifted(g, h, xp, patches + i * CK * h.L);
      widen_delta(g, h, delta + (s + i) * d_sample, wide + i * g.O * h.L);
    }
    const at::Tensor p = at::from_blob(patches, {ns * g.G, g.Cg * g.K, h.L}, opts);
    const at::Tensor dt = at::from_blob(wide, {ns * g.G, h.L, g.Og}, {g.Og * h.L, 1, h.L}, opts);
    at::Tensor out = at::from_blob(prod, {ns * g.G, g.Cg * g.K, g.Og}, opts);
    at::bmm_out(out, p, dt);
    for (int64_t i = 0; i < ns; ++i) abs_add(acc, prod + i * W, W);  // a left-out sample's products are zeros
    // The buffer holds at least W + C*K*L' >= W + C*K*L floats: run_samples' scratch for one whole sample.
    for (int64_t k : odd) run_samples(g, x, delta, k, k + 1, 1, g.L, buf, acc);
  }
}

}  // namespace

void conv_weight_abs_sum_(at::Tensor omega, const at::Tensor& x, const at::Tensor& delta, at::IntArrayRef kernel,
                          at::IntArrayRef stride, at::IntArrayRef dilation, at::IntArrayRef padding, int64_t groups,
                          double alpha, int64_t memory_budget) {
  const char* op = "mas_kernels conv_weight_abs_sum_";
  TORCH_CHECK(omega.device().is_cpu() && x.device().is_cpu() && delta.device().is_cpu(), op,
              ": the native kernels take CPU tensors");
  TORCH_CHECK(omega.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat,
              op, ": omega, x and delta must be float32");
  TORCH_CHECK(omega.is_contiguous() && x.is_contiguous() && delta.is_contiguous(), op,
              ": omega, x and delta must be contiguous");
  TORCH_CHECK(x.dim() == 5 && delta.dim() == 5 && kernel.size() == 3 && stride.size() == 3 && dilation.size() == 3 &&
                  padding.size() == 3,
              op, ": expected x (N, C, D, H, W), delta (N, O, D', H', W') and 3 kernel sizes, strides, dilations, "
              "paddings");
  Geometry g{};
  g.N = x.size(0);
  g.C = x.size(1);
  g.O = delta.size(1);
  g.G = groups;
  TORCH_CHECK(delta.size(0) == g.N && groups >= 1 && g.C % groups == 0 && g.O % groups == 0, op,
              ": x ", x.sizes(), " and delta ", delta.sizes(), " do not match groups=", groups);
  g.Cg = g.C / groups;
  g.Og = g.O / groups;
  g.K = 1;
  g.L = 1;
  for (int i = 0; i < 3; ++i) {
    g.in[i] = x.size(2 + i);
    g.out[i] = delta.size(2 + i);
    g.k[i] = kernel[i];
    g.s[i] = stride[i];
    g.d[i] = dilation[i];
    g.p[i] = padding[i];
    TORCH_CHECK(g.k[i] >= 1 && g.s[i] >= 1 && g.d[i] >= 1 && g.p[i] >= 0, op,
                ": kernel, stride and dilation must be >= 1, padding >= 0");
    g.K *= g.k[i];
    g.L *= g.out[i];
  }
  const int64_t W = g.G * g.Og * g.Cg * g.K;
  TORCH_CHECK(omega.numel() == W, op, ": omega has ", omega.numel(), " elements, the weight ", W);
  if (g.N == 0 || g.L == 0 || W == 0) return;

  const int64_t F = int64_t(sizeof(float));
  const int64_t budget = std::max<int64_t>(memory_budget / F, 1 << 14);  // in floats
  // Blocks of samples, each with its own partial sum (a quarter of the budget at most).
  const int64_t blocks = std::max<int64_t>(1, std::min({g.N, kMaxBlocks, budget / 4 / W}));
  const int64_t threads = blocks > 1 ? std::min<int64_t>(blocks, at::get_num_threads()) : 1;
  // Per thread: a chunk of samples' products (W each) and patches (C*K*positions each).
  const int64_t per_thread = std::max<int64_t>(budget / 2 / threads, 1);
  const int64_t CK = g.C * g.K;
  int64_t positions = g.L;
  if (W + CK * g.L > per_thread) positions = std::max<int64_t>(1, (per_thread - W) / CK);
  TORCH_CHECK(W + CK <= per_thread, op, ": memory_budget=", memory_budget, " bytes is too small for one sample's "
              "product of this convolution and its accumulator (", 2 * F * (2 * W + CK), " bytes at least)");
  const int64_t one = W + CK * positions;
  const int64_t chunk =
      positions < g.L ? 1 : std::max<int64_t>(1, std::min({g.N, kChunkFloats / one, per_thread / one}));

  const float* const px = x.const_data_ptr<float>();
  const float* const pd = delta.const_data_ptr<float>();
  float* const out = omega.data_ptr<float>();
  const float alpha_f = static_cast<float>(alpha);
  // The shifted-rows layout where it applies (the widened positions at most 1.5x the positions, whole samples
  // within the budget): no per-run gather.
  Shifted h{};
  const bool fits = shifted_of(g, h);
  const int64_t one_h = W + (CK + g.O) * h.L;
  const bool shifted = fits && 2 * h.L <= 3 * g.L && h.xpad(g) + one_h <= per_thread;
  const int64_t chunk_h = shifted ? std::max<int64_t>(1, std::min({g.N, kChunkFloats / one_h,
                                                                    (per_thread - h.xpad(g)) / one_h})) : 0;
  const int64_t scratch = shifted ? h.xpad(g) + chunk_h * one_h : chunk * one;
  auto run = [&](int64_t s0, int64_t s1, float* buf, float* acc) {
    if (shifted) {
      run_samples_shifted(g, h, px, pd, s0, s1, chunk_h, buf, acc);
    } else {
      run_samples(g, px, pd, s0, s1, chunk, positions, buf, acc);
    }
  };
  // Scratch as tensors (not std::vector): the profiler's memory events, and so the tests' peak, see it.
  const auto opts = x.options();
  if (blocks == 1) {
    at::Tensor acc = at::zeros({W}, opts), buf = at::empty({scratch}, opts);
    run(0, g.N, buf.data_ptr<float>(), acc.data_ptr<float>());
    sum_blocks(out, acc.const_data_ptr<float>(), 1, W, 0, g.G, g.Og, g.Cg * g.K, alpha_f);
    return;
  }
  if (threads == 1) {
    // The blocks one after another: one block's partial and their running sum, the same additions in the same
    // order as the partials summed below (so the same result), in 2 x the weight instead of blocks x.
    at::Tensor sums = at::zeros({W}, opts), part = at::empty({W}, opts), buf = at::empty({scratch}, opts);
    float* const ps = sums.data_ptr<float>();
    float* const pp = part.data_ptr<float>();
    for (int64_t b = 0; b < blocks; ++b) {
      std::fill(pp, pp + W, 0.0f);
      run(b * g.N / blocks, (b + 1) * g.N / blocks, buf.data_ptr<float>(), pp);
      add_run(ps, pp, W);
    }
    sum_blocks(out, ps, 1, W, 0, g.G, g.Og, g.Cg * g.K, alpha_f);
    return;
  }
  at::Tensor partials = at::zeros({blocks * W}, opts);
  float* const partial = partials.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::Tensor buf = at::empty({scratch}, opts);
    for (int64_t b = b0; b < b1; ++b)
      run(b * g.N / blocks, (b + 1) * g.N / blocks, buf.data_ptr<float>(), partial + b * W);
  });
  at::parallel_for(0, g.G, std::max<int64_t>(1, kChunk / (W / g.G)), [&](int64_t g0, int64_t g1) {
    sum_blocks(out, partial, blocks, W, g0, g1, g.Og, g.Cg * g.K, alpha_f);
  });
}

}  // namespace mas_kernels
