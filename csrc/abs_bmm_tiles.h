// The register-tiled loops of abs_bmm.cpp, included once per instruction set.
//
// No include guard on purpose: abs_bmm.cpp includes this file in one namespace
// per target (x86-64-v4, x86-64-v3, the baseline), each inside
// `#pragma GCC target(...)`, so that everything below, templates included, is
// compiled for that target. (A template defined once and inlined into
// target-attributed callers was compiled as generic vector code first: its
// broadcasts came out lane by lane and its b vectors went through the stack.)
// Needs kMR, Chunk, Kernels, load_f32 and MAS_KERNELS_INLINE from the includer;
// defines `kernels`, this target's entry points.

template <int W>
struct VecOf {
  typedef float type __attribute__((vector_size(4 * W)));
  typedef int32_t itype __attribute__((vector_size(4 * W)));
};

template <int W>
MAS_KERNELS_INLINE typename VecOf<W>::type vload(const float* p) {
  typename VecOf<W>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
MAS_KERNELS_INLINE void vstore(float* p, typename VecOf<W>::type v) {
  std::memcpy(p, &v, sizeof v);
}

template <int W>
MAS_KERNELS_INLINE typename VecOf<W>::type vabs(typename VecOf<W>::type v) {
  using I = typename VecOf<W>::itype;
  return reinterpret_cast<typename VecOf<W>::type>(reinterpret_cast<I>(v) & 0x7fffffff);
}

// One kMR x 2W tile of the output over `ns` samples of a pack chunk.
// ap/bp: sample 0's a panel (nt x kMR) and b panel (nt x 2W); the next
// sample's are a_next / b_next floats further. Per sample, C = sum_t a_t^T b_t
// lives in 2*kMR vector registers; then acc += |C| (acc in L1: one load and
// store per vector and sample, against nt FMAs). FIRST: C starts at zero (else
// it is loaded from `part`: positions of earlier chunks); LAST: the chunk ends
// the samples' positions, so |C| goes into acc (else C is saved in `part`).
template <int W, bool FIRST, bool LAST>
MAS_KERNELS_INLINE void micro_tile(const float* __restrict ap, int64_t a_next, const float* __restrict bp,
                                   int64_t b_next, int64_t ns, int64_t nt, float* __restrict acc,
                                   float* __restrict part, int64_t ld) {
  using V = typename VecOf<W>::type;
  constexpr int64_t NR = 2 * W;
  for (int64_t s = 0; s < ns; ++s, ap += a_next, bp += b_next) {
    V c0[kMR], c1[kMR];
    _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) {
      c0[r] = FIRST ? V{} : vload<W>(part + r * ld);
      c1[r] = FIRST ? V{} : vload<W>(part + r * ld + W);
    }
    const float* a = ap;
    const float* b = bp;
    for (int64_t t = 0; t < nt; ++t, a += kMR, b += NR) {
      const V b0 = vload<W>(b), b1 = vload<W>(b + W);
      _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) {
        // x - (+0) is x for every x (-0 included), so this folds to a broadcast.
        const V av = a[r] - V{};
        c0[r] += av * b0;
        c1[r] += av * b1;
      }
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < kMR; ++r) {
      float* o = LAST ? acc + r * ld : part + r * ld;
      vstore<W>(o, LAST ? vload<W>(o) + vabs<W>(c0[r]) : c0[r]);
      vstore<W>(o + W, LAST ? vload<W>(o + W) + vabs<W>(c1[r]) : c1[r]);
    }
  }
}

// Every micro tile of a work unit's tile for one pack chunk. The b panels of
// one column (q) of micro tiles are read by every row (p): q outer keeps them
// in L1.
template <int W, bool FIRST, bool LAST>
MAS_KERNELS_INLINE void chunk_tiles_as(const Chunk& c) {
  constexpr int64_t NR = 2 * W;
  const int64_t a_next = c.np * c.nt * kMR;
  const int64_t b_next = c.nq * c.nt * NR;
  for (int64_t q = 0; q < c.nq; ++q)
    for (int64_t p = 0; p < c.np; ++p) {
      const int64_t off = p * kMR * c.ld + q * NR;
      micro_tile<W, FIRST, LAST>(c.apack + p * c.nt * kMR, a_next, c.bpack + q * c.nt * NR, b_next, c.ns, c.nt,
                                 c.acc + off, c.part + off, c.ld);
    }
}

// FIRST and LAST as template arguments: the common case (all of a sample's
// positions in one chunk) then never touches `part`.
template <int W>
void chunk_tiles(const Chunk& c) {
  if (c.first && c.last) {
    chunk_tiles_as<W, true, true>(c);
  } else if (c.first) {
    chunk_tiles_as<W, true, false>(c);
  } else if (c.last) {
    chunk_tiles_as<W, false, true>(c);
  } else {
    chunk_tiles_as<W, false, false>(c);
  }
}

// out[s][p][t][k] = x[s0 + s, t0 + t, c0 + p*WIDTH + k], zero past `valid`
// columns: one pack chunk of a (WIDTH = kMR) or b (WIDTH = NR) as fp32 panels.
// Position-major, so each position's row of the input is read once, in order.
// Full panels of a row-contiguous input copy a fixed WIDTH, which the
// compiler turns into vector moves (a runtime-length copy became a memcpy call
// per row, a quarter of the op's time).
constexpr int64_t kPrefetchRows = 4;

template <typename T, int WIDTH>
void pack(const void* xv, const int64_t* st, int64_t s0, int64_t ns, int64_t t0, int64_t nt, int64_t c0,
          int64_t valid, int64_t panels, float* __restrict out) {
  const T* x = static_cast<const T*>(xv);
  const int64_t full = st[2] == 1 ? valid / WIDTH : 0;  // panels copied with the fixed-width loop
  const int64_t panel_stride = nt * WIDTH;
  for (int64_t s = 0; s < ns; ++s)
    for (int64_t t = 0; t < nt; ++t) {
      const T* row = x + (s0 + s) * st[0] + (t0 + t) * st[1] + c0 * st[2];
      float* o = out + s * panels * panel_stride + t * WIDTH;
      if (t + kPrefetchRows < nt) {
        // The input streams from L3 or DRAM, row after row: ask for a later row's
        // lines now (the hardware prefetcher alone left the copy waiting on loads).
        const char* ahead = reinterpret_cast<const char*>(row + kPrefetchRows * st[1]);
        const int64_t bytes = full * WIDTH * int64_t(sizeof(T));
        for (int64_t l = 0; l < bytes; l += 64) __builtin_prefetch(ahead + l);
      }
      int64_t p = 0;
      for (; p < full; ++p) {
        const T* src = row + p * WIDTH;
        float* dst = o + p * panel_stride;
        _Pragma("GCC unroll 32") for (int k = 0; k < WIDTH; ++k) dst[k] = load_f32(src[k]);
      }
      for (; p < panels; ++p) {
        const int64_t n = std::min<int64_t>(WIDTH, valid - p * WIDTH);
        float* dst = o + p * panel_stride;
        for (int64_t k = 0; k < n; ++k) dst[k] = load_f32(row[(p * WIDTH + k) * st[2]]);
        for (int64_t k = n; k < WIDTH; ++k) dst[k] = 0.0f;
      }
    }
}

template <int W>
constexpr Kernels kernels_of() {
  return {2 * W, chunk_tiles<W>,
          {pack<float, kMR>, pack<at::BFloat16, kMR>, pack<at::Half, kMR>},
          {pack<float, 2 * W>, pack<at::BFloat16, 2 * W>, pack<at::Half, 2 * W>}};
}
