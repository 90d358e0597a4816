// The CPU kernels, written once and compiled once per instruction set: each translation unit
// (kernel_generic.cpp, kernel_avx2.cpp) includes the standard headers first, then
// (optionally) switches the target with `#pragma GCC target`, then includes this file inside a
// namespace of its own, so no inline function is shared between instruction sets (no ODR
// mix-ups at link time). Do not include standard headers from here.
//
// Needs before inclusion: <cstdint>, <cstring>, <cmath>, rsir/params.h,
// kernels/cpu/window_attention_cpu.h; macro RSIR_WIDE_VECTORS (1: 256-bit registers). Where
// the target has FMA, `a * b + c` on vectors is contracted to it (GCC/Clang default).
//
// Per work item (b, g, w) and per head h of group g:
//   gather the window's rows into per-thread scratch (compute type: float, or double for
//   double inputs; zero padding to multiples of 8; K (and V in the backward) also
//   transposed), then small GEMMs on register tiles (4 x 16 floats with AVX2, 4 x 8
//   otherwise) written with GCC/Clang vector extensions, the softmax with a vectorised exp,
//   and every output row written straight to its token. The rows of the items kLookahead
//   ahead are prefetched (random rows: otherwise every item waits on its cache misses).
// All sums run in a fixed order that does not depend on the thread: bitwise deterministic.

#if !defined(RSIR_WIDE_VECTORS)
#error "define RSIR_WIDE_VECTORS before including kernel_impl.h"
#endif

// ---------------------------------------------------------------- scalar helpers

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half <-> float (round to nearest even; NaN, inf and subnormals handled).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float mag = (float)mant * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -mag : mag;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}
static inline uint16_t float_to_half(float f) {
  // M. Maratyszcza's FP16 conversion (exact IEEE arithmetic, no -ffast-math).
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u, mant_bits = bits & 0x00000fffu;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : exp_bits + mant_bits));
}
static inline float bf16_to_float(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }
static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct Half { uint16_t x; };
struct BF16 { uint16_t x; };

// Element type -> compute type, load and store.
template <class T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float x) { *p = x; }
};
template <> struct Elem<double> {
  using acc = double;
  static inline double load(const double* p) { return *p; }
  static inline void store(double* p, double x) { *p = x; }
};
template <> struct Elem<Half> {
  using acc = float;
  static inline float load(const Half* p) { return half_to_float(p->x); }
  static inline void store(Half* p, float x) { p->x = float_to_half(x); }
};
template <> struct Elem<BF16> {
  using acc = float;
  static inline float load(const BF16* p) { return bf16_to_float(p->x); }
  static inline void store(BF16* p, float x) { p->x = float_to_bf16(x); }
};

// ---------------------------------------------------------------- the GEMM micro-kernel

// VL lanes of the compute type as a GCC/Clang vector: VL = 8 where registers are 256 bits
// (RSIR_WIDE_VECTORS: one AVX register of floats, two of doubles), else 4 (SSE2 / NEON:
// GCC would lower wider generic vectors through the stack). Loads and stores go through
// memcpy: no alignment assumed. All padded sizes are multiples of 8, so of VL.
constexpr int VL = RSIR_WIDE_VECTORS ? 8 : 4;
template <class A> struct VecT;
template <> struct VecT<float> { typedef float type __attribute__((vector_size(4 * VL))); };
template <> struct VecT<double> { typedef double type __attribute__((vector_size(8 * VL))); };
typedef float VF __attribute__((vector_size(4 * VL)));
typedef int32_t VI __attribute__((vector_size(4 * VL)));

// Sum of the lanes, in a fixed order (pairwise).
template <class V>
static inline auto hsum(V v) -> decltype(v[0] + v[0]) {
  if (VL == 8) return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4 % VL] + v[5 % VL]) + (v[6 % VL] + v[7 % VL]));
  return (v[0] + v[1]) + (v[2] + v[3]);
}

template <class V, class A>
static inline V vload(const A* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V, class A>
static inline void vstore(A* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// One 4 x (8 * NV) tile of C = A * B: NV vectors per row, 4 * NV accumulators in registers
// while k runs (per k: NV vector loads of B, four broadcasts of A, 4 * NV multiply-adds).
// TA: A is given transposed (stored [k][i], leading dimension lda): C = A^T B.
template <int NV, bool TA, class A>
static inline void gemm_tile(A* __restrict c, int64_t ldc, const A* __restrict a0, int64_t lda,
                             const A* __restrict b, int64_t ldb, int64_t K) {
  typedef typename VecT<A>::type V;
  const A* a1 = a0 + lda;
  const A* a2 = a1 + lda;
  const A* a3 = a2 + lda;
  V c0[NV], c1[NV], c2[NV], c3[NV];
  for (int v = 0; v < NV; ++v) c0[v] = c1[v] = c2[v] = c3[v] = V{};
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    const A x0 = TA ? a0[k * lda] : a0[k], x1 = TA ? a0[k * lda + 1] : a1[k];
    const A x2 = TA ? a0[k * lda + 2] : a2[k], x3 = TA ? a0[k * lda + 3] : a3[k];
    for (int v = 0; v < NV; ++v) {
      const V bv = vload<V>(b + VL * v);
      // contracted to FMA where the target has it (GCC/Clang contract by default)
      c0[v] = x0 * bv + c0[v];
      c1[v] = x1 * bv + c1[v];
      c2[v] = x2 * bv + c2[v];
      c3[v] = x3 * bv + c3[v];
    }
  }
  for (int v = 0; v < NV; ++v) {
    vstore(c + VL * v, c0[v]);
    vstore(c + ldc + VL * v, c1[v]);
    vstore(c + 2 * ldc + VL * v, c2[v]);
    vstore(c + 3 * ldc + VL * v, c3[v]);
  }
}

// C[M x Nc] = A[M x K] * B[K x Nc]; M % 4 == 0, Nc % 8 == 0; row-major with leading
// dimensions lda, ldb, ldc. Floats: 4 x 16 tiles (8 accumulators: enough independent FMA
// chains to cover the FMA latency), a 4 x 8 tile for an odd last column block; doubles:
// 4 x 8 tiles (two registers per row already).
// gemm_t: the same with A given transposed (stored [K x M], leading dimension lda): C = A^T B.
template <bool TA, class A>
static void gemm_any(A* __restrict C, int64_t ldc, const A* __restrict Am, int64_t lda,
                     const A* __restrict Bm, int64_t ldb, int64_t M, int64_t Nc, int64_t K) {
  // 256-bit floats: 4 x 16 tiles (two vectors a row), else 4 x 8 (two 128-bit vectors of
  // floats, or one 8-lane vector of doubles = two registers): 8 accumulator registers.
  constexpr int kWide = (sizeof(A) == 4 && RSIR_WIDE_VECTORS) ? 2 : (8 / VL);
  constexpr int kNarrow = 8 / VL;
  for (int64_t i = 0; i < M; i += 4) {
    const A* a = TA ? Am + i : Am + i * lda;
    int64_t j = 0;
    for (; j + VL * kWide <= Nc; j += VL * kWide) gemm_tile<kWide, TA>(C + i * ldc + j, ldc, a, lda, Bm + j, ldb, K);
    for (; j < Nc; j += 8) gemm_tile<kNarrow, TA>(C + i * ldc + j, ldc, a, lda, Bm + j, ldb, K);
  }
}
template <class A>
static void gemm(A* C, int64_t ldc, const A* Am, int64_t lda, const A* Bm, int64_t ldb, int64_t M, int64_t Nc,
                 int64_t K) {
  gemm_any<false>(C, ldc, Am, lda, Bm, ldb, M, Nc, K);
}
template <class A>
static void gemm_t(A* C, int64_t ldc, const A* Am, int64_t lda, const A* Bm, int64_t ldb, int64_t M, int64_t Nc,
                   int64_t K) {
  gemm_any<true>(C, ldc, Am, lda, Bm, ldb, M, Nc, K);
}

// cols[d * ldc + i] = rows[i * ldr + d] for i < m, d < D (in-cache transpose)
template <class A>
static inline void transpose(A* __restrict cols, int64_t ldc, const A* __restrict rows, int64_t ldr, int64_t m,
                             int64_t D) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t d = 0; d < D; ++d) cols[d * ldc + i] = rows[i * ldr + d];
}

// ---------------------------------------------------------------- softmax rows

// 2^y on VL lanes: y = n + f with n = round(y) and f in [-1/2, 1/2] exact, 2^f by its
// degree-6 Taylor polynomial (relative error ~1.2e-7), 2^n into the exponent bits. Exactly 0
// below -126 (and for -inf); NaN in, NaN out; y <= 126. The softmax folds log2(e) into the
// scale, so no range reduction by ln 2 is needed (about 5 % faster forward than Cephes expf).
static inline VF exp2_approx_v(VF y) {
  const VF lo = VF{} - 126.0f, hi = VF{} + 126.0f, magic = VF{} + 12582912.0f;
  VF yc = y > hi ? hi : y;
  yc = yc < lo ? lo : yc;
  const VF t = yc + magic;  // rounds to the nearest integer
  const VF n = t - magic;
  const VF f = yc - n;
  const VI ni = (VI)t - 0x4b400000;
  VF poly = VF{} + 1.5403530393381609e-4f;
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.0f;
  const VF res = poly * (VF)((ni + 127) << 23);
  return y < lo ? VF{} : res;
}

static inline VI lane_ids(int64_t j) {
  VI base;
  for (int w = 0; w < VL; ++w) base[w] = w;
  return base + (int32_t)j;
}

// Forward softmax of the score rows S[0..m) (row stride mp, mp % 8 == 0):
// S <- exp(scale * S - c_i) = 2^(y - y_max) with y = log2(e) * scale * S (0 beyond column m);
// inv[i] = 1 / row sum; lse_i = ln 2 * y_max + log(sum) stored through lse_at(i).
// Three passes: scale, mask and max per row; one flat exp loop over the whole block (tight:
// its constants stay in registers; per-row exp loops were ~6 % slower overall); row sums.
template <class LseAt>
static inline void softmax_rows(float* S, int64_t m, int64_t mp, float scale, float* inv, LseAt lse_at) {
  const float ninf = -__builtin_inff();
  const float scale2 = (float)((double)scale * 1.4426950408889634);  // base 2: log2(e) folded in
  for (int64_t i = 0; i < m; ++i) {
    float* s = S + i * mp;
    VF vmax = VF{} + ninf;
    for (int64_t j = 0; j < mp; j += VL) {
      VF x = vload<VF>(s + j) * scale2;
      x = lane_ids(j) < (int32_t)m ? x : VF{} + ninf;
      vstore(s + j, x);
      vmax = vmax > x ? vmax : x;
    }
    float mx = vmax[0];
    for (int w = 1; w < VL; ++w) mx = vmax[w] > mx ? vmax[w] : mx;
    inv[i] = mx;
    for (int64_t j = 0; j < mp; j += VL) vstore(s + j, vload<VF>(s + j) - mx);
  }
  for (int64_t e = 0; e < m * mp; e += VL) vstore(S + e, exp2_approx_v(vload<VF>(S + e)));
  for (int64_t i = 0; i < m; ++i) {
    const float* s = S + i * mp;
    VF vsum = {0};
    for (int64_t j = 0; j < mp; j += VL) vsum += vload<VF>(s + j);
    const float sum = hsum(vsum);
    *lse_at(i) = inv[i] * 0.69314718055994531f + std::log(sum);
    inv[i] = 1.0f / sum;
  }
}

template <class LseAt>
static inline void softmax_rows(double* S, int64_t m, int64_t mp, double scale, double* inv, LseAt lse_at) {
  for (int64_t i = 0; i < m; ++i) {
    double* s = S + i * mp;
    double mx = -__builtin_inf();
    for (int64_t j = 0; j < m; ++j) {
      s[j] *= scale;
      mx = s[j] > mx ? s[j] : mx;
    }
    double sum = 0;
    for (int64_t j = 0; j < m; ++j) {
      s[j] = std::exp(s[j] - mx);
      sum += s[j];
    }
    for (int64_t j = m; j < mp; ++j) s[j] = 0;
    *lse_at(i) = mx + std::log(sum);
    inv[i] = 1.0 / sum;
  }
}

// Backward: P <- exp(scale * S - lse_i) = 2^(log2(e) * (scale * S - lse_i)),
// dS <- P * (dP - delta_i) for rows i < m (both 0 beyond column m); the exp runs as one flat
// loop over the block, as in the forward.
static inline void grad_rows(float* P, float* dS, int64_t m, int64_t mp, float scale, const float* lse,
                             const float* delta) {
  const float ninf = -__builtin_inff();
  const float scale2 = (float)((double)scale * 1.4426950408889634);  // base 2, as the forward
  for (int64_t i = 0; i < m; ++i) {
    float* s = P + i * mp;
    const float l = lse[i] * 1.44269504088896341f;
    for (int64_t j = 0; j < mp; j += VL) {
      const VF x = vload<VF>(s + j) * scale2 - l;
      vstore(s + j, lane_ids(j) < (int32_t)m ? x : VF{} + ninf);
    }
  }
  for (int64_t e = 0; e < m * mp; e += VL) vstore(P + e, exp2_approx_v(vload<VF>(P + e)));
  for (int64_t i = 0; i < m; ++i) {
    const float* pr = P + i * mp;
    float* dr = dS + i * mp;
    const float di = delta[i];
    for (int64_t j = 0; j < mp; j += VL) vstore(dr + j, vload<VF>(pr + j) * (vload<VF>(dr + j) - di));
  }
}

static inline void grad_rows(double* P, double* dS, int64_t m, int64_t mp, double scale, const double* lse,
                             const double* delta) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < mp; ++j) {
      const double e = j < m ? std::exp(P[i * mp + j] * scale - lse[i]) : 0.0;
      P[i * mp + j] = e;
      dS[i * mp + j] = e * (dS[i * mp + j] - delta[i]);
    }
}

// ---------------------------------------------------------------- addressing

static inline int64_t read_index(const WindowAttentionParams& p, int64_t b, int64_t g, int64_t pos) {
  const int64_t off = b * p.index_stride[0] + g * p.index_stride[1] + pos * p.index_stride[2];
  if (p.index_bytes == 4) return (int64_t)static_cast<const int32_t*>(p.index)[off];
  return static_cast<const int64_t*>(p.index)[off];
}

// The window's valid tokens (index values outside 0..L-1 are skipped): returns their count.
static inline int64_t window_tokens(const WindowAttentionParams& p, int64_t item, int64_t* tok,
                                    int64_t* b_out, int64_t* g_out) {
  const int64_t nw = p.num_windows();
  const int64_t w = item % nw, bg = item / nw;
  const int64_t g = bg % p.G, b = bg / p.G;
  const int64_t start = w * p.N, n = imin(p.N, p.L - start);
  int64_t m = 0;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t t = read_index(p, b, g, start + j);
    if (t >= 0 && t < p.L) tok[m++] = t;
  }
  *b_out = b;
  *g_out = g;
  return m;
}

static inline int64_t offset4(const int64_t* s, int64_t b, int64_t t, int64_t h) {
  return b * s[0] + t * s[1] + h * s[2];
}

// rows[i * ld + d] = x[b, tok[i], h, d] for i < m, d < D
template <class T, class A>
static inline void gather_rows(A* rows, int64_t ld, const T* x, const int64_t* s, int64_t b, int64_t h,
                               const int64_t* tok, int64_t m, int64_t D) {
  const int64_t sd = s[3];
  for (int64_t i = 0; i < m; ++i) {
    const T* src = x + offset4(s, b, tok[i], h);
    A* dst = rows + i * ld;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) dst[d] = Elem<T>::load(src + d);
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = Elem<T>::load(src + d * sd);
    }
  }
}

// x[b, tok[i], h, d] = rows[i * ld + d] * a
template <class T, class A>
static inline void scatter_rows(T* x, const int64_t* s, int64_t b, int64_t h, const A* rows, int64_t ld,
                                const int64_t* tok, int64_t m, int64_t D, A a) {
  const int64_t sd = s[3];
  for (int64_t i = 0; i < m; ++i) {
    T* dst = x + offset4(s, b, tok[i], h);
    const A* src = rows + i * ld;
    if (sd == 1) {
      for (int64_t d = 0; d < D; ++d) Elem<T>::store(dst + d, src[d] * a);
    } else {
      for (int64_t d = 0; d < D; ++d) Elem<T>::store(dst + d * sd, src[d] * a);
    }
  }
}

// Software prefetch of the rows x[b, tok[i], h0 .. h0 + nh - 1, :] (the gathers are random
// accesses over the whole sequence: without this, each item waits on cache misses one row
// at a time). rw = 1 prefetches for writing.
static inline void prefetch(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // inline asm: GCC deletes loops that contain nothing but __builtin_prefetch
  __asm__ volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);
  __asm__ volatile("" : : "r"(p) : "memory");
#endif
}

template <class T>
static inline void prefetch_rows(const T* x, const int64_t* s, int64_t b, int64_t h0, int64_t nh,
                                 const int64_t* tok, int64_t m, int64_t D) {
  const int64_t line = 64 / (int64_t)sizeof(T);
  const int64_t span = s[3] == 1 ? D : 1;  // a non-unit dim stride: the first element only
  for (int64_t i = 0; i < m; ++i)
    for (int64_t hh = 0; hh < nh; ++hh) {
      const T* row = x + offset4(s, b, tok[i], h0 + hh);
      for (int64_t d = 0; d < span; d += line) prefetch(row + d);
      prefetch(row + span - 1);  // the row may straddle one more line
    }
}

template <class A>
static inline A* carve(char*& cursor, int64_t count) {
  A* p = reinterpret_cast<A*>(cursor);
  cursor += round_up(count * (int64_t)sizeof(A), 64);
  return p;
}

// The work items' token lists, read kLookahead items ahead of their use, with their rows
// prefetched then: the gathers are random accesses over the whole sequence, and without
// this each item would wait on its cache misses one row at a time.
constexpr int kLookahead = 1;

struct ItemTokens {
  int64_t* tok;
  int64_t b, g, m;
};

template <class Prefetch>
struct TokenRing {
  ItemTokens slot[kLookahead + 1];
  const WindowAttentionParams& p;
  int64_t begin, end;
  Prefetch prefetch;

  TokenRing(const WindowAttentionParams& p_, char*& cursor, int64_t wp, int64_t begin_, int64_t end_, Prefetch pf)
      : p(p_), begin(begin_), end(end_), prefetch(pf) {
    for (int s = 0; s <= kLookahead; ++s) slot[s].tok = carve<int64_t>(cursor, wp);
    for (int64_t it = begin; it < end && it < begin + kLookahead; ++it) load(it);
  }
  void load(int64_t item) {
    ItemTokens& t = slot[(item - begin) % (kLookahead + 1)];
    t.m = window_tokens(p, item, t.tok, &t.b, &t.g);
    prefetch(t);
  }
  // The tokens of `item` (called for begin, begin + 1, ... in order); starts reading ahead.
  const ItemTokens& get(int64_t item) {
    if (item + kLookahead < end) load(item + kLookahead);
    return slot[(item - begin) % (kLookahead + 1)];
  }
};

template <class Prefetch>
static inline TokenRing<Prefetch> make_ring(const WindowAttentionParams& p, char*& cursor, int64_t wp, int64_t begin,
                                            int64_t end, Prefetch pf) {
  return TokenRing<Prefetch>(p, cursor, wp, begin, end, pf);
}

// ---------------------------------------------------------------- forward

template <class T>
static void forward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;  // compute type, also the lse type
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, 8), wp = round_up(imin(p.N, p.L), 8);
  const A scale = (A)p.scale;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);

  const int64_t bytes = 64 * 8 + (kLookahead + 1) * round_up(wp * 8, 64) +
                        5 * round_up(wp * dp * (int64_t)sizeof(A), 64) +
                        round_up(wp * wp * (int64_t)sizeof(A), 64) + 2 * round_up(wp * (int64_t)sizeof(A), 64);
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  A* Q = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* KT = carve<A>(cursor, dp * wp);  // rows d, cols j
  A* V = carve<A>(cursor, wp * dp);   // rows j, cols d
  A* O = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* S = carve<A>(cursor, wp * wp);   // scores, then probabilities
  A* inv = carve<A>(cursor, wp);

  auto ring = make_ring(p, cursor, wp, begin, end, [&](const ItemTokens& t) {
    const int64_t h0 = t.g * hpg;
    prefetch_rows(q, p.q_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(k, p.k_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(v, p.v_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(out, p.out_stride, t.b, h0, hpg, t.tok, t.m, D);
  });
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, 8), mr = round_up(m, 4);
    // zero padding (identical for every head of the item; the gathers below overwrite the rest)
    std::memset(Q, 0, sizeof(A) * mp * dp);
    std::memset(KT, 0, sizeof(A) * dp * mp);
    std::memset(V, 0, sizeof(A) * mp * dp);
    for (int64_t hh = 0; hh < hpg; ++hh) {
      const int64_t h = g * hpg + hh;
      gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
      gather_rows(O, dp, k, p.k_stride, b, h, tok, m, D);  // K rows (O is free until P V)
      transpose(KT, mp, O, dp, m, D);
      gather_rows(V, dp, v, p.v_stride, b, h, tok, m, D);
      gemm(S, mp, Q, dp, KT, mp, mr, mp, D);  // S = Q K^T
      A* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
      softmax_rows(S, m, mp, scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; });
      for (int64_t i = m; i < mr; ++i)
        for (int64_t j = 0; j < mp; ++j) S[i * mp + j] = 0;
      gemm(O, dp, S, mp, V, dp, mr, dp, m);  // O = P V
      for (int64_t i = 0; i < m; ++i) {  // out rows = O / rowsum
        A* src = O + i * dp;
        const A a = inv[i];
        for (int64_t d = 0; d < D; ++d) src[d] *= a;
      }
      scatter_rows(out, p.out_stride, b, h, O, dp, tok, m, D, (A)1);
    }
  }
}

// ---------------------------------------------------------------- backward

template <class T>
static void backward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, 8), wp = round_up(imin(p.N, p.L), 8);
  const A scale = (A)p.scale;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* out = static_cast<const T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
  const A* lse = static_cast<const A*>(p.lse);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  const int64_t mat = round_up(wp * dp * (int64_t)sizeof(A), 64);
  const int64_t bytes = 64 * 8 + (kLookahead + 1) * round_up(wp * 8, 64) + 10 * mat +
                        2 * round_up(wp * wp * (int64_t)sizeof(A), 64) +
                        2 * round_up(wp * (int64_t)sizeof(A), 64);
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  A* Q = carve<A>(cursor, wp * dp);     // rows i, cols d
  A* K = carve<A>(cursor, wp * dp);     // rows j, cols d
  A* KT = carve<A>(cursor, dp * wp);    // rows d, cols j
  A* VT = carve<A>(cursor, dp * wp);    // rows d, cols j
  A* dO = carve<A>(cursor, wp * dp);    // rows i, cols d
  A* dQ = carve<A>(cursor, wp * dp);    // rows i, cols d
  A* dK = carve<A>(cursor, wp * dp);    // rows j, cols d
  A* dV = carve<A>(cursor, wp * dp);    // rows j, cols d
  A* P = carve<A>(cursor, wp * wp);     // rows i, cols j
  A* dS = carve<A>(cursor, wp * wp);    // dP, then dS
  A* lrow = carve<A>(cursor, wp);
  A* delta = carve<A>(cursor, wp);

  auto ring = make_ring(p, cursor, wp, begin, end, [&](const ItemTokens& t) {
    const int64_t h0 = t.g * hpg;
    prefetch_rows(q, p.q_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(k, p.k_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(v, p.v_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(out, p.out_stride, t.b, h0, hpg, t.tok, t.m, D);
    prefetch_rows(dout, p.dout_stride, t.b, h0, hpg, t.tok, t.m, D);
  });
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, 8), mr = round_up(m, 4);
    std::memset(Q, 0, sizeof(A) * mp * dp);
    std::memset(K, 0, sizeof(A) * mp * dp);
    std::memset(KT, 0, sizeof(A) * dp * mp);
    std::memset(VT, 0, sizeof(A) * dp * mp);
    std::memset(dO, 0, sizeof(A) * mp * dp);
    std::memset(dQ, 0, sizeof(A) * mp * dp);
    for (int64_t hh = 0; hh < hpg; ++hh) {
      const int64_t h = g * hpg + hh;
      gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
      gather_rows(K, dp, k, p.k_stride, b, h, tok, m, D);
      transpose(KT, mp, K, dp, m, D);
      gather_rows(dQ, dp, v, p.v_stride, b, h, tok, m, D);  // V rows (dQ is free until dS K)
      transpose(VT, mp, dQ, dp, m, D);
      gather_rows(dO, dp, dout, p.dout_stride, b, h, tok, m, D);
      gather_rows(dK, dp, out, p.out_stride, b, h, tok, m, D);  // O rows (dK is free until dS^T Q)
      for (int64_t i = 0; i < m; ++i) {  // delta_i = dO_i . O_i, lse_i
        A* orow = dK + i * dp;
        for (int64_t d = D; d < dp; ++d) orow[d] = 0;
        typedef typename VecT<A>::type V;
        V acc = V{};
        for (int64_t d = 0; d < dp; d += VL) acc += vload<V>(dO + i * dp + d) * vload<V>(orow + d);
        delta[i] = hsum(acc);
        lrow[i] = lse[b * p.lse_stride[0] + h * p.lse_stride[1] + tok[i] * p.lse_stride[2]];
      }
      gemm(P, mp, Q, dp, KT, mp, mr, mp, D);    // S = Q K^T
      gemm(dS, mp, dO, dp, VT, mp, mr, mp, D);  // dP = dO V^T
      grad_rows(P, dS, m, mp, scale, lrow, delta);  // P = exp(S * scale - lse), dS = P * (dP - delta)
      for (int64_t i = m; i < mp; ++i)
        for (int64_t j = 0; j < mp; ++j) P[i * mp + j] = dS[i * mp + j] = 0;
      gemm(dQ, dp, dS, mp, K, dp, mr, dp, m);      // dQ = dS K
      gemm_t(dK, dp, dS, mp, Q, dp, mr, dp, m);    // dK = dS^T Q
      gemm_t(dV, dp, P, mp, dO, dp, mr, dp, m);    // dV = P^T dO
      scatter_rows(dq, p.dq_stride, b, h, dQ, dp, tok, m, D, scale);
      scatter_rows(dk, p.dk_stride, b, h, dK, dp, tok, m, D, scale);
      scatter_rows(dv, p.dv_stride, b, h, dV, dp, tok, m, D, (A)1);
    }
  }
}

// ---------------------------------------------------------------- entry points

static void forward_entry(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: forward_impl<float>(p, begin, end); break;
    case DType::kFloat64: forward_impl<double>(p, begin, end); break;
    case DType::kFloat16: forward_impl<Half>(p, begin, end); break;
    case DType::kBFloat16: forward_impl<BF16>(p, begin, end); break;
  }
}

static void backward_entry(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: backward_impl<float>(p, begin, end); break;
    case DType::kFloat64: backward_impl<double>(p, begin, end); break;
    case DType::kFloat16: backward_impl<Half>(p, begin, end); break;
    case DType::kBFloat16: backward_impl<BF16>(p, begin, end); break;
  }
}
