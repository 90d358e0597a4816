// The CPU kernels, written once and compiled once per instruction set: each translation unit
// (kernel_generic.cpp, kernel_avx2.cpp, kernel_avx512.cpp, kernel_avx512amx.cpp) includes the
// standard headers first, then (optionally) switches the target with `#pragma GCC target`, then
// includes this file inside a namespace of its own, so no inline function is shared between
// instruction sets (no ODR mix-ups at link time). Do not include standard headers from here.
//
// Needs before inclusion: <cstdint>, <cstring>, <cmath> (and <immintrin.h> for
// RSIR_WIDE_VECTORS == 2), rsir/params.h, kernels/cpu/window_attention_cpu.h; macro
// RSIR_WIDE_VECTORS (1: 256-bit registers, 2: AVX-512). Where the target has FMA, `a * b + c`
// on vectors is contracted to it (GCC/Clang default).
//
// Per work item (b, g, w) and per head h of group g:
//   gather the window's rows into per-thread scratch (compute type: float, or double for
//   double inputs; zero padding to multiples of PAD = 8, 16 with AVX-512; K (and V in the
//   backward) also transposed), then small GEMMs on register tiles (8 x 32 floats with
//   AVX-512, 4 x 16 with AVX2, 4 x 8 otherwise) written with GCC/Clang vector extensions, the
//   softmax with a vectorised exp (float: on transposed scores S^T = K Q^T, so each query's
//   max and sums run down its column as vertical vector operations: softmax_cols, grad_cols;
//   Q, dO transposed instead of K, V), and every output row written straight to its token. The
//   rows of the item kLookahead ahead are prefetched a few at a time during the current one
//   (random rows: otherwise every item waits on its cache misses).
// All sums run in a fixed order that does not depend on the thread: bitwise deterministic.

#if !defined(RSIR_WIDE_VECTORS)
#error "define RSIR_WIDE_VECTORS before including kernel_impl.h"
#endif
#if !defined(RSIR_AMX_BF16)
#define RSIR_AMX_BF16 0  // 1: the bf16 forward on AMX tiles (kernel_bf16_amx.h)
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

// VL lanes of the compute type as a GCC/Clang vector: VL = 16 where registers are 512 bits
// (RSIR_WIDE_VECTORS == 2: one AVX-512 register of floats, two of doubles), 8 where they are
// 256 bits (RSIR_WIDE_VECTORS == 1), else 4 (SSE2 / NEON: GCC would lower wider generic
// vectors through the stack). Loads and stores go through memcpy: no alignment assumed.
// All padded sizes are multiples of PAD = max(8, VL), so of VL.
constexpr int VL = RSIR_WIDE_VECTORS == 2 ? 16 : RSIR_WIDE_VECTORS ? 8 : 4;
constexpr int PAD = VL > 8 ? VL : 8;
template <class A> struct VecT;
template <> struct VecT<float> { typedef float type __attribute__((vector_size(4 * VL))); };
template <> struct VecT<double> { typedef double type __attribute__((vector_size(8 * VL))); };
typedef float VF __attribute__((vector_size(4 * VL)));
typedef int32_t VI __attribute__((vector_size(4 * VL)));

template <class V, class A>
static inline V vload(const A* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <class V, class A>
static inline void vstore(A* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// One MR x (VL * NV) tile of C = A * B: NV vectors per row, MR * NV accumulators in
// registers while k runs (per k: NV vector loads of B, MR broadcasts of A, MR * NV
// multiply-adds). TA: A is given transposed (stored [k][i], leading dimension lda): C = A^T B.
// Every element's sum runs over k in order whatever the tile shape.
template <int MR, int NV, bool TA, class A>
static inline void gemm_tile(A* __restrict c, int64_t ldc, const A* __restrict a0, int64_t lda,
                             const A* __restrict b, int64_t ldb, int64_t K) {
  typedef typename VecT<A>::type V;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t k = 0; k < K; ++k, b += ldb) {
    V bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = vload<V>(b + VL * v);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const A x = TA ? a0[k * lda + r] : a0[r * lda + k];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = x * bv[v] + acc[r][v];  // contracted to FMA
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(c + r * ldc + VL * v, acc[r][v]);
}

// C[M x Nc] = A[M x K] * B[K x Nc]; Nc % PAD == 0, any M; row-major with leading
// dimensions lda, ldb, ldc. Tiles of kRows x (VL * kWide) with 2 * 4 = 8 (AVX2: 4 x 16
// floats, enough independent FMA chains to cover the FMA latency) or 8 * 2 = 16 (AVX-512:
// 8 x 32 floats; 32 registers) accumulators, narrower tiles for the last column block. No
// padding rows: M = 49 runs as 5 tiles of 8 rows and one of 9 (a lone 1-row tile would be one
// latency-bound FMA chain per vector; measured no faster). Doubles: 4 x 8 tiles (two registers
// per row already).
// gemm_t: the same with A given transposed (stored [K x M], leading dimension lda): C = A^T B.
template <int N> struct IntC { static constexpr int value = N; };

// f(IntC<n>{}) for a run-time n in 1 .. Max (nothing for n = 0)
template <int Max, class F>
static inline void with_rows(int64_t n, F&& f) {
  if constexpr (Max > 0) {
    if (n == Max) return f(IntC<Max>{});
    with_rows<Max - 1>(n, f);
  }
}

template <bool TA, class A>
static void gemm_any(A* __restrict C, int64_t ldc, const A* __restrict Am, int64_t lda,
                     const A* __restrict Bm, int64_t ldb, int64_t M, int64_t Nc, int64_t K) {
  constexpr bool kF = sizeof(A) == 4;
  constexpr int kWide = (kF && RSIR_WIDE_VECTORS) ? 2 : (PAD / VL);
  constexpr int kNarrow = PAD / VL;
  constexpr int kRows = (kF && RSIR_WIDE_VECTORS == 2) ? 8 : 4;
  auto row_block = [&](auto rows_tag, int64_t i) {
    constexpr int R = decltype(rows_tag)::value;
    const A* a = TA ? Am + i : Am + i * lda;
    int64_t j = 0;
    for (; j + VL * kWide <= Nc; j += VL * kWide) gemm_tile<R, kWide, TA>(C + i * ldc + j, ldc, a, lda, Bm + j, ldb, K);
    for (; j < Nc; j += VL * kNarrow) gemm_tile<R, kNarrow, TA>(C + i * ldc + j, ldc, a, lda, Bm + j, ldb, K);
  };
  // the last r = M % kRows rows: r < kRows / 2 join the last full tile, else a tile of their own
  const int64_t r = M % kRows, full = M / kRows - (r > 0 && 2 * r < kRows && M > kRows);
  for (int64_t i = 0; i < full * kRows; i += kRows) row_block(IntC<kRows>{}, i);
  const int64_t rest = M - full * kRows;  // < 1.5 kRows
  with_rows<kRows + kRows / 2 - 1>(rest, [&](auto rows_tag) { row_block(rows_tag, full * kRows); });
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

#if RSIR_WIDE_VECTORS == 2
// AVX-512 floats: 16 x 16 blocks transposed in registers (4 rounds of 16 shuffles) instead of
// 16 * 16 scalar moves with strided stores. Also writes cols[d * ldc + i] = 0 for m <= i <
// round_up(m, 16) (rows past m read as zeros); rows[i * ldr + d] is read for d < round_up(D, 16)
// (the padding columns only reach output rows >= D, which are not stored). ldr % 16 == 0.
static inline void transpose(float* __restrict cols, int64_t ldc, const float* __restrict rows, int64_t ldr,
                             int64_t m, int64_t D) {
  for (int64_t i0 = 0; i0 < m; i0 += 16) {
    for (int64_t d0 = 0; d0 < D; d0 += 16) {
      __m512 r[16], t[16];
      for (int k = 0; k < 16; ++k)
        r[k] = i0 + k < m ? _mm512_loadu_ps(rows + (i0 + k) * ldr + d0) : _mm512_setzero_ps();
      for (int k = 0; k < 16; k += 2) {  // per 128-bit lane L: rows k, k + 1 of columns 4L .. 4L + 3
        t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
      }
      for (int g = 0; g < 16; g += 4) {  // r[g + c], lane L: rows g .. g + 3 of column 4L + c
        r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
        r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
        r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
        r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
      }
      for (int c = 0; c < 4; ++c) {  // column 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c]
        const __m512 s0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), s1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        const __m512 s2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        const __m512 s3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
        t[c] = _mm512_shuffle_f32x4(s0, s2, 0x88);       // column c
        t[8 + c] = _mm512_shuffle_f32x4(s0, s2, 0xDD);   // column 8 + c
        t[4 + c] = _mm512_shuffle_f32x4(s1, s3, 0x88);   // column 4 + c
        t[12 + c] = _mm512_shuffle_f32x4(s1, s3, 0xDD);  // column 12 + c
      }
      const int64_t nd = imin(16, D - d0);
      for (int64_t k = 0; k < nd; ++k) _mm512_storeu_ps(cols + (d0 + k) * ldc + i0, t[k]);
    }
  }
}
#endif

// ---------------------------------------------------------------- softmax rows

// 2^y on VL lanes: y = n + f with n = round(y) and f in [-1/2, 1/2] exact, 2^f by its
// degree-6 Taylor polynomial (relative error ~1.2e-7), 2^n into the exponent bits. Exactly 0
// below -126 (and for -inf); NaN in, NaN out; y <= 0 (every caller passes a softmax exponent,
// score - column max, rounded: never above 0). The softmax folds log2(e) into the scale, so no
// range reduction by ln 2 is needed (about 5 % faster forward than Cephes expf).
static inline VF exp2_approx_v(VF y) {
  const VF lo = VF{} - 126.0f;
  VF yc = y;
#if RSIR_WIDE_VECTORS == 2
  // AVX-512: n by one rounding instruction, 2^n applied by vscalefps (poly * 2^n, rounded once:
  // the same bits as the multiply below); y < -126 is selected to 0 at the end either way.
  const VF n = _mm512_roundscale_ps(yc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VF f = yc - n;
#else
  yc = yc < lo ? lo : yc;
  const VF magic = VF{} + 12582912.0f;
  const VF t = yc + magic;  // rounds to the nearest integer
  const VF n = t - magic;
  const VF f = yc - n;
  const VI ni = (VI)t - 0x4b400000;
#endif
  VF poly = VF{} + 1.5403530393381609e-4f;
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.0f;
#if RSIR_WIDE_VECTORS == 2
  const VF res = _mm512_scalef_ps(poly, n);
#else
  const VF res = poly * (VF)((ni + 127) << 23);
#endif
  return y < lo ? VF{} : res;
}

// Softmax rows at any score magnitude. With sigma = sign(scale) (1 for scale 0), the row's
// exponents are taken as (sigma * S_ij - M_i) * |scale| with M_i = max_j sigma * S_ij: the
// difference is <= 0 and exact for the scores that matter (Sterbenz), so the row maximum
// gets exactly 2^0 = 1 and nothing can overflow. Scaling before subtracting (y = scale * S,
// then y - max y) would not do: with FMA, `y_j - y_max` contracts to fma(S_j, scale, -y_max),
// which differs from the rounded y that the max was taken of by up to half an ulp of y --
// 2^64 and more at |y| ~ 1e9, then inf * 0 = NaN.
//
// Forward, rows i < m of S (row stride mp, mp % 8 == 0):
//   S <- 2^((sigma * S - M_i) * |scale| * log2(e)) (0 beyond column m); inv[i] = 1 / row sum;
//   lse_i = |scale| * M_i + ln(sum) stored through lse_at(i).
// Float runs the same on transposed scores (softmax_cols, grad_cols: one lane per row i).
// The backward (grad_rows / grad_cols) recomputes M_i and the row sum from the same scores, so its P is
// the forward's P to the bit: no rebuild from the stored lse, whose rounding (an ulp of a
// number as large as the scores) would be a relative error of P at large scores.
struct ScaleSplit {
  float scale2;  // |scale| * log2(e)
  double abs_scale;
};
static inline ScaleSplit split_scale(double scale) {
  const double a = scale < 0 ? -scale : scale;
  return {(float)(a * 1.4426950408889634), a};
}

#if RSIR_WIDE_VECTORS == 2
// ln x on 16 lanes for the row sums (x in [1, 2^126): normal, positive; NaN in, NaN out):
// Cephes logf (x = 2^e * (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1), degree-8 polynomial,
// ln 2 split in two), ~1e-7 relative, the accuracy of std::log in float.
static inline VF log_v(VF x) {
  const VI xi = (VI)x;
  VF e = __builtin_convertvector(((xi >> 23) & 0xff) - 126, VF);  // x = 2^e * mant, mant in [1/2, 1)
  VF mant = (VF)((xi & 0x007fffff) | 0x3f000000);
  const auto small = mant < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const VF f = small ? (mant + mant) - 1.0f : mant - 1.0f;  // exact
  const VF z = f * f;
  VF y = VF{} + 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  VF r = f + y;
  r = r + e * 0.693359375f;
  return x == x ? r : x;
}

#endif


// Forward on transposed scores (float): ST[j * mp + i] = q_i . k_j for keys j < m (rows) and
// queries i < mp (columns; those >= m are padding queries whose results are dropped). Each
// query's max and sum run down its column: vertical vector operations across the rows, one
// lane per query, no horizontal reduction and no mask (the rows stop at m).
//   ST <- 2^((sigma * ST - M_i) * |scale| * log2(e)) for rows j < m; inv[i] = 1 / column sum;
//   lse_i = |scale| * M_i + ln(sum) stored through lse_at(i) for i < m.
// The sum over j runs in order (one accumulator per lane): deterministic. The max needs no
// order (exact), so two accumulators halve its dependency chain.
// sigma * x with sigma = -1 (kNeg) or 1 known at compile time: a negation or nothing, the
// same bits as the multiply (the softmaxes below are compiled for both signs of the scale).
template <bool kNeg>
static inline VF signed_load(const float* p) {
  const VF x = vload<VF>(p);
  return kNeg ? -x : x;
}

// block_ready(c) runs before column block c is read: the AMX path stores the scores of block c
// + VL there, one block ahead of their reads (AMX stores do not forward to vector loads).
struct NoBlockHook {
  void operator()(int64_t) const {}
};

template <bool kNeg, class LseAt, class Pump, class BlockHook>
static inline void softmax_cols_signed(float* ST, int64_t m, int64_t mp, double scale, float* inv, LseAt lse_at,
                                       Pump pump, BlockHook block_ready) {
  const ScaleSplit sc = split_scale(scale);
  for (int64_t c = 0; c < mp; c += VL) {
    block_ready(c);
    float* col = ST + c;
    VF mx0 = VF{} - __builtin_inff(), mx1 = mx0;
    int64_t j = 0;
    for (; j + 1 < m; j += 2) {
      const VF x0 = signed_load<kNeg>(col + j * mp), x1 = signed_load<kNeg>(col + (j + 1) * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
      mx1 = mx1 > x1 ? mx1 : x1;
    }
    if (j < m) {
      const VF x0 = signed_load<kNeg>(col + j * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
    }
    const VF mxn = mx0 > mx1 ? mx0 : mx1;  // a NaN score poisons its column's sum anyway
    VF vsum = VF{};
    for (j = 0; j < m; ++j) {
      pump();
      const VF e = exp2_approx_v((signed_load<kNeg>(col + j * mp) - mxn) * sc.scale2);
      vstore(col + j * mp, e);
      vsum += e;
    }
#if RSIR_WIDE_VECTORS == 2
    const VF l = mxn * (float)sc.abs_scale + log_v(vsum);
#else
    VF l;
    for (int w = 0; w < VL; ++w) l[w] = (float)(sc.abs_scale * mxn[w] + std::log((double)vsum[w]));
#endif
    vstore(inv + c, 1.0f / vsum);
    for (int64_t i = c; i < imin(m, c + VL); ++i) *lse_at(i) = l[i - c];
  }
}
template <class LseAt, class Pump, class BlockHook = NoBlockHook>
static inline void softmax_cols(float* ST, int64_t m, int64_t mp, double scale, float* inv, LseAt lse_at,
                                Pump pump, BlockHook block_ready = {}) {
  if (scale < 0)
    softmax_cols_signed<true>(ST, m, mp, scale, inv, lse_at, pump, block_ready);
  else
    softmax_cols_signed<false>(ST, m, mp, scale, inv, lse_at, pump, block_ready);
}

template <class LseAt, class Pump>
static inline void softmax_rows(double* S, int64_t m, int64_t mp, double scale, double* inv, LseAt lse_at, Pump pump) {
  const double sigma = scale < 0 ? -1.0 : 1.0, abs_scale = scale < 0 ? -scale : scale;
  for (int64_t i = 0; i < m; ++i) {
    pump();
    double* s = S + i * mp;
    double mx = -__builtin_inf();
    for (int64_t j = 0; j < m; ++j) mx = s[j] * sigma > mx ? s[j] * sigma : mx;
    double sum = 0;
    for (int64_t j = 0; j < m; ++j) {
      s[j] = std::exp((s[j] * sigma - mx) * abs_scale);
      sum += s[j];
    }
    for (int64_t j = m; j < mp; ++j) s[j] = 0;
    *lse_at(i) = abs_scale * mx + std::log(sum);
    inv[i] = 1.0 / sum;
  }
}

// Backward, rows i < m (P and dS 0 beyond column m), P recomputed exactly as the forward's:
//   e_ij = 2^((sigma S_ij - M_i) |scale| log2(e)), P_ij = e_ij / sum_j e_ij,
//   delta_i = sum_j P_ij dP_ij / sum_j P_ij, dS <- P * (dP - delta_i).
// delta comes from the very P that dS uses, in the accumulation type, so each row of dS sums to
// zero up to its rounding; normalised by P's row sum, so that a large common part of dP (v with
// a large mean) cancels exactly instead of leaving (sum - 1) * dP. FlashAttention's
// delta_i = dO_i . O_i reads O rounded to the input dtype: at a saturated softmax (P near
// one-hot) dS cancels and that rounding alone put fp16 / bf16 dq beyond 2x the same-precision
// reference's error (docs/design.md section 9). Neither O nor lse is read.
//
// delta is refined once: d0 = the rounded delta, c = sum_j e_j (dP_ij - d0) / sum_j e_j (its
// rounding error, up to an ulp or two of delta), dS = P * ((dP - d0) - c). At a saturated row
// (P_max = 1 - eps) dP_max - delta = sum_{j != max} P_j (dP_max - dP_j) ~ eps |dP|: one ulp of
// delta is a relative error of ulp / (eps |dP|) in dS_max, 2e-4 at eps = 6e-4 (fuzz case
// cpp:generic:7604, 5x the fp32 reference's error there). dP_max - d0 is exact (Sterbenz), so c
// and dS_max keep the relative accuracy of their terms.

// Backward on transposed scores (float), as softmax_cols: PT[j * mp + i] = q_i . k_j and
// dST[j * mp + i] = dO_i . v_j for keys j < m (rows), queries i < mp (columns); per query
// (one lane), down its column, the steps above: e_j, sum e, sum e dP, delta refined
// once; PT <- P^T, dST <- dS^T. Sums over j in order: deterministic.
template <bool kNeg, class Pump>
static inline void grad_cols_signed(float* PT, float* dST, int64_t m, int64_t mp, double scale, Pump pump) {
  const ScaleSplit sc = split_scale(scale);
  for (int64_t c = 0; c < mp; c += VL) {
    float* pc = PT + c;
    float* dc = dST + c;
    VF mx0 = VF{} - __builtin_inff(), mx1 = mx0;
    int64_t j = 0;
    for (; j + 1 < m; j += 2) {
      const VF x0 = signed_load<kNeg>(pc + j * mp), x1 = signed_load<kNeg>(pc + (j + 1) * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
      mx1 = mx1 > x1 ? mx1 : x1;
    }
    if (j < m) {
      const VF x0 = signed_load<kNeg>(pc + j * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
    }
    const VF mx = mx0 > mx1 ? mx0 : mx1;
    VF acc = VF{}, esum = VF{};
    for (j = 0; j < m; ++j) {
      pump();
      const VF e = exp2_approx_v((signed_load<kNeg>(pc + j * mp) - mx) * sc.scale2);
      vstore(pc + j * mp, e);
      acc += e * vload<VF>(dc + j * mp);
      esum += e;
    }
    const VF inv = 1.0f / esum, d0 = acc * inv;  // esum >= 1: the column max gives 2^0
    VF corr = VF{};
    for (j = 0; j < m; ++j) corr += vload<VF>(pc + j * mp) * (vload<VF>(dc + j * mp) - d0);
    corr *= inv;
    for (j = 0; j < m; ++j) {
      const VF pv = vload<VF>(pc + j * mp) * inv;
      vstore(pc + j * mp, pv);
      vstore(dc + j * mp, pv * ((vload<VF>(dc + j * mp) - d0) - corr));
    }
  }
}
template <class Pump>
static inline void grad_cols(float* PT, float* dST, int64_t m, int64_t mp, double scale, Pump pump) {
  if (scale < 0)
    grad_cols_signed<true>(PT, dST, m, mp, scale, pump);
  else
    grad_cols_signed<false>(PT, dST, m, mp, scale, pump);
}

template <class Pump>
static inline void grad_rows(double* P, double* dS, int64_t m, int64_t mp, double scale, Pump pump) {
  const double sigma = scale < 0 ? -1.0 : 1.0, abs_scale = scale < 0 ? -scale : scale;
  for (int64_t i = 0; i < m; ++i) {
    pump();
    double* pr = P + i * mp;
    double* dr = dS + i * mp;
    double mx = -__builtin_inf();
    for (int64_t j = 0; j < m; ++j) mx = pr[j] * sigma > mx ? pr[j] * sigma : mx;
    double pdp_sum = 0.0, e_sum = 0.0;
    for (int64_t j = 0; j < mp; ++j) {
      pr[j] = j < m ? std::exp((pr[j] * sigma - mx) * abs_scale) : 0.0;
      pdp_sum += pr[j] * dr[j];
      e_sum += pr[j];
    }
    const double inv = 1.0 / e_sum, d0 = pdp_sum * inv;  // delta refined once, as in grad_cols
    double c = 0.0;
    for (int64_t j = 0; j < mp; ++j) c += pr[j] * (dr[j] - d0);
    c *= inv;
    for (int64_t j = 0; j < mp; ++j) {
      pr[j] *= inv;
      dr[j] = pr[j] * ((dr[j] - d0) - c);
    }
  }
}

// ---------------------------------------------------------------- addressing

static inline int64_t read_index(const WindowAttentionParams& p, int64_t b, int64_t g, int64_t pos) {
  const int64_t off = b * p.index_stride[0] + g * p.index_stride[1] + pos * p.index_stride[2];
  if (p.index_bytes == 4) return (int64_t)static_cast<const int32_t*>(p.index)[off];
  return static_cast<const int64_t*>(p.index)[off];
}

// The window's valid tokens (index values outside 0..L-1 are skipped): returns their count;
// marks them in p.visits when recorded.
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
  if (p.visits) {  // relaxed atomic stores (plain moves): other threads may mark the same byte
    uint8_t* row = p.visits + (b * p.G + g) * p.L;
    for (int64_t i = 0; i < m; ++i) __atomic_store_n(row + tok[i], (uint8_t)1, __ATOMIC_RELAXED);
  }
  *b_out = b;
  *g_out = g;
  return m;
}

static inline int64_t offset4(const int64_t* s, int64_t b, int64_t t, int64_t h) {
  return b * s[0] + t * s[1] + h * s[2];
}

#if RSIR_WIDE_VECTORS == 2
// 16 elements of T as floats, exactly (bf16: a shift; fp16: vcvtph2ps)
static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 load16(const BF16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#endif

// rows[i * ld + d] = x[b, tok[i], h, d] for i < m, d < D
template <class T, class A>
static inline void gather_rows(A* rows, int64_t ld, const T* x, const int64_t* s, int64_t b, int64_t h,
                               const int64_t* tok, int64_t m, int64_t D) {
  const int64_t sd = s[3];
#if RSIR_WIDE_VECTORS == 2
  // float rows from float, bf16 or fp16, whole vectors (RSIR's D = 16, 32): one vector move
  // per 16 elements and one multiply per row for its address, not a generic loop per row
  if constexpr (sizeof(A) == 4) {
    if (sd == 1 && D % 16 == 0) {
      const T* base = x + b * s[0] + h * s[2];
      for (int64_t i = 0; i < m; ++i) {
        const T* src = base + tok[i] * s[1];
        for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(rows + i * ld + d, load16(src + d));
      }
      return;
    }
  }
#endif
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

// dst[d] = src[d] * a for d < D (contiguous), in T.
template <class T, class A>
static inline void store_row(T* dst, const A* src, int64_t D, A a) {
  for (int64_t d = 0; d < D; ++d) Elem<T>::store(dst + d, src[d] * a);
}
#if RSIR_WIDE_VECTORS == 2
// float: 16 at a time (src is read up to the vector's end: rows of the kernels' scratch are
// padded to 16)
static inline void store_row(float* dst, const float* src, int64_t D, float a) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t d = 0; d < D; d += 16) {
    const __m512 x = _mm512_mul_ps(_mm512_loadu_ps(src + d), av);
    if (D - d >= 16)
      _mm512_storeu_ps(dst + d, x);
    else
      _mm512_mask_storeu_ps(dst + d, (__mmask16)((1u << (D - d)) - 1), x);
  }
}
// bf16: 16 at a time, rounded to nearest even by integer arithmetic as float_to_bf16 (the same
// bits, NaN quieted the same way; what GCC makes of the loop above is 8 at a time, slower).
static inline void store_row(BF16* dst, const float* src, int64_t D, float a) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t d = 0; d < D; d += 16) {
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(src + d), av));
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    const __m256i h16 = _mm512_cvtepi32_epi16(r);
    if (D - d >= 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), h16);
    else  // src is read up to the vector's end: rows of the kernels' scratch are padded to 16
      _mm256_mask_storeu_epi16(dst + d, (__mmask16)((1u << (D - d)) - 1), h16);
  }
}
#endif

// x[b, tok[i], h, d] = rows[i * ld + d] * (per_row ? per_row[i] : a)
template <class T, class A>
static inline void scatter_rows(T* x, const int64_t* s, int64_t b, int64_t h, const A* rows, int64_t ld,
                                const int64_t* tok, int64_t m, int64_t D, const A* per_row, A a_all) {
  const int64_t sd = s[3];
  for (int64_t i = 0; i < m; ++i) {
    T* dst = x + offset4(s, b, tok[i], h);
    const A* src = rows + i * ld;
    const A a = per_row ? per_row[i] : a_all;
    if (sd == 1) {
      store_row(dst, src, D, a);
    } else {
      for (int64_t d = 0; d < D; ++d) Elem<T>::store(dst + d * sd, src[d] * a);
    }
  }
}

#if RSIR_WIDE_VECTORS == 2
// Whether the kernel writes an output with streaming stores: its rows of `heads` heads
// x[b, t, g * heads .. (g + 1) * heads - 1, :] (heads back to back where heads > 1) are whole,
// aligned cache lines for every b, t, g (unit dim stride, 64-byte aligned base and offsets), and
// it is larger than a core's L2 (smaller outputs stay cached for their reader). A streaming store
// needs no read of the line first: no prefetch of the rows, a quarter less traffic in the forward
// at D = 16. fp32 rows of D % 16 == 0 stream per head (heads = 1, stream_rows); 2-byte rows of D
// = 16 are half a line, so the kernels stage a group's heads (heads = hpg, Staged).
static inline bool streams(const void* x, const int64_t* s, const WindowAttentionParams& p, int64_t heads,
                           int64_t elem_bytes) {
  constexpr int64_t kCachedBytes = int64_t(2) << 20;
  const int64_t line = 64 / elem_bytes;  // elements per cache line
  return s[3] == 1 && (heads == 1 || s[2] == p.D) && (heads * p.D) % line == 0 && (heads * s[2]) % line == 0 &&
         (uintptr_t)x % 64 == 0 && s[0] % line == 0 && s[1] % line == 0 &&
         p.B * p.L * p.H * p.D * elem_bytes > kCachedBytes;
}

// x[b, tok[i], h, :] = rows[i * ld + :] * (per_row ? per_row[i] : a), streaming stores (streams(.., 1, 4)).
static inline void stream_rows(float* x, const int64_t* s, int64_t b, int64_t h, const float* rows, int64_t ld,
                               const int64_t* tok, int64_t m, int64_t D, const float* per_row, float a) {
  for (int64_t i = 0; i < m; ++i) {
    float* dst = x + offset4(s, b, tok[i], h);
    const __m512 ai = _mm512_set1_ps(per_row ? per_row[i] : a);
    for (int64_t d = 0; d < D; d += 16) _mm512_stream_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(rows + i * ld + d), ai));
  }
}
#endif

// Software prefetch of the rows x[b, tok[i], h0 .. h0 + nh - 1, :] (the gathers are random
// accesses over the whole sequence: without this, each item waits on cache misses one row
// at a time). To L2, not L1 (prefetcht2, not prefetcht0): a prefetcht0 holds one of the
// core's few L1 fill buffers per line and stalls when they are all taken (11% of the AMX bf16
// forward's samples sat on it); the demand loads then hit L2 (docs/performance.md).
static inline void prefetch(const void* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  // inline asm: GCC deletes loops that contain nothing but __builtin_prefetch
  __asm__ volatile("prefetcht2 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 3);  // elsewhere unmeasured: the builtin's default (L1)
  __asm__ volatile("" : : "r"(p) : "memory");
#endif
}

// Deferred prefetches: the addresses of the next item's rows, issued a few at a time while
// the current item computes (pump, from the softmax's row loop). Issued in one burst, the
// hundreds of prefetches of an item fill the miss buffers and stall the core until the first
// lines arrive; spread out, they overlap with the arithmetic.
struct PrefetchQueue {
  const void** addr = nullptr;
  int64_t n = 0, pos = 0, cap = 0;
  void push(const void* p) {
    if (n < cap) addr[n++] = p;
    else prefetch(p);
  }
  void pump(int64_t k) {
    const int64_t e = imin(n, pos + k);
    for (; pos < e; ++pos) prefetch(addr[pos]);
  }
  void drain() {
    pump(n);
    n = pos = 0;
  }
};

// Prefetch lines per row of D elements of T (at most).
template <class T>
static inline int64_t prefetch_lines(int64_t D) { return D * (int64_t)sizeof(T) / 64 + 2; }

// Where the group's nh heads lie back to back (head stride D, unit dim stride: the usual
// contiguous layout), a token's rows are prefetched as one span of nh * D elements: no line is
// prefetched twice (rows shorter than a line: bf16 / fp16 at D = 16 share lines between heads).
template <class T>
static inline void prefetch_rows(const T* x, const int64_t* s, int64_t b, int64_t h0, int64_t nh,
                                 const int64_t* tok, int64_t m, int64_t D, PrefetchQueue& pq) {
  const int64_t line = 64 / (int64_t)sizeof(T);
  const bool joined = s[3] == 1 && s[2] == D;
  // a non-unit dim stride: the first element only
  const int64_t span = s[3] != 1 ? 1 : joined ? nh * D : D;
  if (joined) nh = 1;
  // rows that start on a line and span whole lines (aligned base and offsets): no straddle
  // check, one address multiply per token (what the loop below does, in fewer instructions)
  if (joined && span % line == 0 && (uintptr_t)x % 64 == 0 && s[0] % line == 0 && s[1] % line == 0 &&
      (h0 * s[2]) % line == 0) {
    const T* base = x + b * s[0] + h0 * s[2];
    for (int64_t i = 0; i < m; ++i) {
      const T* row = base + tok[i] * s[1];
      for (int64_t d = 0; d < span; d += line) pq.push(row + d);
    }
    return;
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t hh = 0; hh < nh; ++hh) {
      const T* row = x + offset4(s, b, tok[i], h0 + hh);
      for (int64_t d = 0; d < span; d += line) pq.push(row + d);
      const T* last = row + span - 1;  // the row may straddle one more line
      if (((uintptr_t)last >> 6) != ((uintptr_t)(row + (span - 1) / line * line) >> 6)) pq.push(last);
    }
}

// The kernels' matrices [first, end) cleared once per call, not per work item: what is padding
// for an item (rows past m, columns past D, keys or queries past m) only ever reaches padding
// outputs (tests/test_robustness.py: a NaN there stays there), so after this first clear (no
// uninitialised reads) it holds zeros or what earlier items left.
static inline void zero_padding(char* first, char* end) { std::memset(first, 0, (size_t)(end - first)); }

template <class A>
static inline A* carve(char*& cursor, int64_t count) {
  A* p = reinterpret_cast<A*>(cursor);
  cursor += round_up(count * (int64_t)sizeof(A), 64);
  return p;
}

// 0, 1, ..., wp - 1: the rows of a staging block, as the token list of scatter_rows.
static inline const int64_t* identity_rows(char*& cursor, int64_t wp) {
  int64_t* rows = carve<int64_t>(cursor, wp);
  for (int64_t i = 0; i < wp; ++i) rows[i] = i;
  return rows;
}

// One output's rows for a group's heads, staged per work item ([i][hh][d]) and then written to the
// tokens as whole lines with streaming stores (2-byte outputs that streams(x, s, p, hpg, 2)).
template <class T>
struct Staged {
  T* block;
  const int64_t* rows;  // identity_rows
  int64_t stride[4];
  static int64_t bytes(int64_t wp, int64_t hpg, int64_t D) { return round_up(wp * hpg * D * (int64_t)sizeof(T), 64); }
  Staged(char*& cursor, const int64_t* rows_, int64_t wp, int64_t hpg, int64_t D)
      : block(carve<T>(cursor, wp * hpg * D)), rows(rows_), stride{0, hpg * D, D, 1} {}
  // head hh's rows (src[i * ld + d] * (per_row ? per_row[i] : a) for i < m, d < D) into the block
  template <class A>
  void put(int64_t hh, const A* src, int64_t ld, int64_t m, int64_t D, const A* per_row, A a) {
    scatter_rows(block, stride, 0, hh, src, ld, rows, m, D, per_row, a);
  }
#if RSIR_WIDE_VECTORS == 2
  // x[b, tok[i], h0 .. h0 + hpg - 1, :] = block row i for i < m
  void flush(T* x, const int64_t* s, int64_t b, int64_t h0, const int64_t* tok, int64_t m) const {
    for (int64_t i = 0; i < m; ++i) {
      T* dst = x + offset4(s, b, tok[i], h0);
      for (int64_t c = 0; c < stride[1]; c += 32)
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + c), _mm512_loadu_si512(block + i * stride[1] + c));
    }
  }
#endif
};

// The work items' token lists, read kLookahead items ahead of their use, with their rows
// prefetched then: the gathers are random accesses over the whole sequence, and without
// this each item would wait on its cache misses one row at a time.
constexpr int kLookahead = 1;

template <class T>
static inline int64_t prefetch_queue_cap(int64_t wp, int64_t hpg, int64_t D, int64_t arrays) {
  return arrays * hpg * wp * prefetch_lines<T>(D);
}

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
  PrefetchQueue queue;  // the rows of the item ahead, to be prefetched during this one

  // queue_cap: prefetch addresses per item, at most (see prefetch_queue_cap)
  TokenRing(const WindowAttentionParams& p_, char*& cursor, int64_t wp, int64_t queue_cap, int64_t begin_,
            int64_t end_, Prefetch pf)
      : p(p_), begin(begin_), end(end_), prefetch(pf) {
    for (int s = 0; s <= kLookahead; ++s) slot[s].tok = carve<int64_t>(cursor, wp);
    queue.addr = carve<const void*>(cursor, queue_cap);
    queue.cap = queue_cap;
    for (int64_t it = begin; it < end && it < begin + kLookahead; ++it) load(it);
    queue.drain();
  }
  void load(int64_t item) {
    ItemTokens& t = slot[(item - begin) % (kLookahead + 1)];
    t.m = window_tokens(p, item, t.tok, &t.b, &t.g);
    prefetch(t, queue);
  }
  // The tokens of `item` (called for begin, begin + 1, ... in order); queues the prefetches of
  // the item ahead (whatever the previous item left unissued is issued now).
  const ItemTokens& get(int64_t item) {
    queue.drain();
    if (item + kLookahead < end) load(item + kLookahead);
    return slot[(item - begin) % (kLookahead + 1)];
  }
  // Issue the queued prefetches spread over `steps` calls of pump().
  int64_t per_step(int64_t steps) const { return steps > 0 ? (queue.n + steps - 1) / steps : queue.n; }
  void pump(int64_t k) { queue.pump(k); }
};

// Bytes of scratch for the token ring: token lists and the prefetch queue (arrays: the number
// of row arrays prefetched per item).
template <class T>
static inline int64_t ring_bytes(int64_t wp, int64_t hpg, int64_t D, int64_t arrays) {
  return (kLookahead + 1) * round_up(wp * 8, 64) + round_up(prefetch_queue_cap<T>(wp, hpg, D, arrays) * 8, 64);
}

template <class Prefetch>
static inline TokenRing<Prefetch> make_ring(const WindowAttentionParams& p, char*& cursor, int64_t wp,
                                            int64_t queue_cap, int64_t begin, int64_t end, Prefetch pf) {
  return TokenRing<Prefetch>(p, cursor, wp, queue_cap, begin, end, pf);
}

// ---------------------------------------------------------------- forward

// The forward's prefetches for a work item: its rows of q, k, v, and of out unless out is
// written with streaming stores.
template <class T>
static inline auto forward_prefetch(const WindowAttentionParams& p, bool out_rows) {
  return [&p, out_rows](const ItemTokens& t, PrefetchQueue& pq) {
    const int64_t hpg = p.heads_per_group(), h0 = t.g * hpg;
    prefetch_rows(static_cast<const T*>(p.q), p.q_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    prefetch_rows(static_cast<const T*>(p.k), p.k_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    prefetch_rows(static_cast<const T*>(p.v), p.v_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    if (out_rows) prefetch_rows(static_cast<const T*>(p.out), p.out_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
  };
}

template <class T>
static void forward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;  // compute type, also the lse type
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, PAD), wp = round_up(imin(p.N, p.L), PAD);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);

  const int64_t qcap = prefetch_queue_cap<T>(wp, hpg, D, 4);
  const int64_t bytes = 64 * 8 + ring_bytes<T>(wp, hpg, D, 4) +
                        4 * round_up(wp * dp * (int64_t)sizeof(A), 64) +
                        round_up(wp * wp * (int64_t)sizeof(A), 64) + round_up(wp * (int64_t)sizeof(A), 64) +
                        round_up(wp * 8, 64) + Staged<T>::bytes(wp, hpg, D);
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  char* const matrices = cursor;
  A* Q = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* KT = carve<A>(cursor, dp * wp);  // rows d, cols j
  A* V = carve<A>(cursor, wp * dp);   // rows j, cols d
  A* O = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* S = carve<A>(cursor, wp * wp);   // scores, then probabilities
  zero_padding(matrices, cursor);
  A* inv = carve<A>(cursor, wp);
  // Large outputs whose rows are whole lines: fp32 rows streamed per head, 2-byte rows staged.
  Staged<T> staged(cursor, identity_rows(cursor, wp), wp, hpg, D);
#if RSIR_WIDE_VECTORS == 2
  bool stream_out = false, stage_out = false;
  if constexpr (sizeof(T) == 4 && sizeof(A) == 4) stream_out = streams(out, p.out_stride, p, 1, 4);
  if constexpr (sizeof(T) == 2) stage_out = streams(out, p.out_stride, p, hpg, 2);
#else
  const bool stream_out = false, stage_out = false;
#endif

  auto ring = make_ring(p, cursor, wp, qcap, begin, end, forward_prefetch<T>(p, !stream_out && !stage_out));
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, PAD);
    if constexpr (sizeof(A) == 4) {
      // float: scores transposed (ST = K Q^T: keys down, queries across), the softmax's max and
      // sum run down the columns (softmax_cols), then O = (P^T)^T V.
      const int64_t pk = ring.per_step(hpg * (mp / VL) * m);  // prefetches per exp vector
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        transpose(KT, mp, Q, dp, m, D);             // Q^T: rows d, cols i
        gather_rows(V, dp, k, p.k_stride, b, h, tok, m, D);  // K rows
        gemm(S, mp, V, dp, KT, mp, m, mp, D);       // ST = K Q^T: rows j, cols i
        gather_rows(V, dp, v, p.v_stride, b, h, tok, m, D);
        A* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
        softmax_cols(
            S, m, mp, p.scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; },
            [&] { ring.pump(pk); });
        gemm_t(O, dp, S, mp, V, dp, m, dp, m);  // O = P V with P^T stored
#if RSIR_WIDE_VECTORS == 2
        if (stream_out) {
          stream_rows(reinterpret_cast<float*>(out), p.out_stride, b, h, O, dp, tok, m, D, inv, 1.0f);
          continue;
        }
#endif
        if (stage_out)  // out rows = O / column sum
          staged.put(hh, O, dp, m, D, inv, (A)1);
        else
          scatter_rows(out, p.out_stride, b, h, O, dp, tok, m, D, inv, (A)1);
      }
#if RSIR_WIDE_VECTORS == 2
      if (stage_out) staged.flush(out, p.out_stride, b, g * hpg, tok, m);
#endif
    } else {  // double: rows of scores, softmax_rows
      const int64_t pk = ring.per_step(hpg * m);  // prefetches per softmax row
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        gather_rows(O, dp, k, p.k_stride, b, h, tok, m, D);  // K rows (O is free until P V)
        transpose(KT, mp, O, dp, m, D);
        gather_rows(V, dp, v, p.v_stride, b, h, tok, m, D);
        gemm(S, mp, Q, dp, KT, mp, m, mp, D);  // S = Q K^T
        A* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
        softmax_rows(
            S, m, mp, p.scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; },
            [&] { ring.pump(pk); });
        gemm(O, dp, S, mp, V, dp, m, dp, m);  // O = P V
        scatter_rows(out, p.out_stride, b, h, O, dp, tok, m, D, inv, (A)1);  // out rows = O / rowsum
      }
    }
  }
#if RSIR_WIDE_VECTORS == 2
  if (stream_out || stage_out) _mm_sfence();  // streaming stores are weakly ordered: visible before we return
#endif
}

// ---------------------------------------------------------------- backward

template <class T>
static void backward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, PAD), wp = round_up(imin(p.N, p.L), PAD);
  const A scale = (A)p.scale;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  const int64_t mat = round_up(wp * dp * (int64_t)sizeof(A), 64);
  const int64_t qcap = prefetch_queue_cap<T>(wp, hpg, D, 7);
  const int64_t staging = Staged<T>::bytes(wp, hpg, D);
  const int64_t bytes = 64 * 8 + ring_bytes<T>(wp, hpg, D, 7) + 11 * mat +
                        2 * round_up(wp * wp * (int64_t)sizeof(A), 64) +
                        round_up(wp * (int64_t)sizeof(A), 64) + round_up(wp * 8, 64) + 3 * staging;
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  char* const matrices = cursor;
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
  A* Vr = carve<A>(cursor, wp * dp);    // rows j, cols d (float path)
  zero_padding(matrices, cursor);
  // Large outputs whose rows are whole lines: fp32 rows streamed per head, 2-byte rows staged.
  const int64_t* rows = identity_rows(cursor, wp);
  Staged<T> dQs(cursor, rows, wp, hpg, D), dKs(cursor, rows, wp, hpg, D), dVs(cursor, rows, wp, hpg, D);
#if RSIR_WIDE_VECTORS == 2
  bool stream_grads = false, stage_grads = false;
  auto all_stream = [&](int64_t heads, int64_t elem_bytes) {
    return streams(dq, p.dq_stride, p, heads, elem_bytes) && streams(dk, p.dk_stride, p, heads, elem_bytes) &&
           streams(dv, p.dv_stride, p, heads, elem_bytes);
  };
  if constexpr (sizeof(T) == 4 && sizeof(A) == 4) stream_grads = all_stream(1, 4);
  if constexpr (sizeof(T) == 2) stage_grads = all_stream(hpg, 2);
#else
  const bool stream_grads = false, stage_grads = false;
#endif

  auto ring = make_ring(p, cursor, wp, qcap, begin, end, [&](const ItemTokens& t, PrefetchQueue& pq) {
    const int64_t h0 = t.g * hpg;
    prefetch_rows(q, p.q_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(k, p.k_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(v, p.v_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(dout, p.dout_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    // the rows that scatter_rows writes: without this, their stores miss the cache (and, with
    // 4 KiB pages, the TLB) at the scatter (a prefetch measured as fast as prefetchw or faster)
    if (!stream_grads && !stage_grads) {
      prefetch_rows(dq, p.dq_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
      prefetch_rows(dk, p.dk_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
      prefetch_rows(dv, p.dv_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    }
  });
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, PAD);
    if constexpr (sizeof(A) == 4) {
      // float: scores and dP transposed (keys down, queries across), grad_cols down the columns.
      A* QT = KT;   // rows d, cols i
      A* dOT = VT;  // rows d, cols i
      const int64_t pk = ring.per_step(hpg * (mp / VL) * m);  // prefetches per exp vector
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        transpose(QT, mp, Q, dp, m, D);
        gather_rows(K, dp, k, p.k_stride, b, h, tok, m, D);
        gather_rows(Vr, dp, v, p.v_stride, b, h, tok, m, D);
        gather_rows(dO, dp, dout, p.dout_stride, b, h, tok, m, D);
        transpose(dOT, mp, dO, dp, m, D);
        gemm(P, mp, K, dp, QT, mp, m, mp, D);     // S^T = K Q^T
        gemm(dS, mp, Vr, dp, dOT, mp, m, mp, D);  // dP^T = V dO^T
        grad_cols(P, dS, m, mp, p.scale, [&] { ring.pump(pk); });  // P^T, dS^T
        gemm_t(dQ, dp, dS, mp, K, dp, m, dp, m);  // dQ = dS K
        gemm(dK, dp, dS, mp, Q, dp, m, dp, m);    // dK = dS^T Q
        gemm(dV, dp, P, mp, dO, dp, m, dp, m);    // dV = P^T dO
#if RSIR_WIDE_VECTORS == 2
        if (stream_grads) {
          stream_rows(reinterpret_cast<float*>(dq), p.dq_stride, b, h, dQ, dp, tok, m, D, nullptr, scale);
          stream_rows(reinterpret_cast<float*>(dk), p.dk_stride, b, h, dK, dp, tok, m, D, nullptr, scale);
          stream_rows(reinterpret_cast<float*>(dv), p.dv_stride, b, h, dV, dp, tok, m, D, nullptr, 1.0f);
          continue;
        }
#endif
        if (stage_grads) {
          dQs.put(hh, dQ, dp, m, D, (const A*)nullptr, scale);
          dKs.put(hh, dK, dp, m, D, (const A*)nullptr, scale);
          dVs.put(hh, dV, dp, m, D, (const A*)nullptr, (A)1);
          continue;
        }
        scatter_rows(dq, p.dq_stride, b, h, dQ, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dk, p.dk_stride, b, h, dK, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dv, p.dv_stride, b, h, dV, dp, tok, m, D, (const A*)nullptr, (A)1);
      }
#if RSIR_WIDE_VECTORS == 2
      if (stage_grads) {
        dQs.flush(dq, p.dq_stride, b, g * hpg, tok, m);
        dKs.flush(dk, p.dk_stride, b, g * hpg, tok, m);
        dVs.flush(dv, p.dv_stride, b, g * hpg, tok, m);
      }
#endif
    } else {  // double: rows of scores, grad_rows
      const int64_t pk = ring.per_step(hpg * m);  // prefetches per softmax row
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        gather_rows(K, dp, k, p.k_stride, b, h, tok, m, D);
        transpose(KT, mp, K, dp, m, D);
        gather_rows(dQ, dp, v, p.v_stride, b, h, tok, m, D);  // V rows (dQ is free until dS K)
        transpose(VT, mp, dQ, dp, m, D);
        gather_rows(dO, dp, dout, p.dout_stride, b, h, tok, m, D);
        gemm(P, mp, Q, dp, KT, mp, m, mp, D);    // S = Q K^T
        gemm(dS, mp, dO, dp, VT, mp, m, mp, D);  // dP = dO V^T
        grad_rows(P, dS, m, mp, p.scale, [&] { ring.pump(pk); });  // P = softmax(scale * S), dS = P * (dP - delta)
        gemm(dQ, dp, dS, mp, K, dp, m, dp, m);      // dQ = dS K
        gemm_t(dK, dp, dS, mp, Q, dp, m, dp, m);    // dK = dS^T Q
        gemm_t(dV, dp, P, mp, dO, dp, m, dp, m);    // dV = P^T dO
        scatter_rows(dq, p.dq_stride, b, h, dQ, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dk, p.dk_stride, b, h, dK, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dv, p.dv_stride, b, h, dV, dp, tok, m, D, (const A*)nullptr, (A)1);
      }
    }
  }
#if RSIR_WIDE_VECTORS == 2
  if (stream_grads || stage_grads) _mm_sfence();  // streaming stores are weakly ordered: visible before we return
#endif
}

#if RSIR_AMX_BF16
#include "kernel_bf16_amx.h"
#endif

// ---------------------------------------------------------------- entry points

static void forward_entry(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: forward_impl<float>(p, begin, end); break;
    case DType::kFloat64: forward_impl<double>(p, begin, end); break;
    case DType::kFloat16: forward_impl<Half>(p, begin, end); break;
    case DType::kBFloat16:
#if RSIR_AMX_BF16
      if (p.D <= kAmxMaxDim && imin(p.N, p.L) <= kAmxMaxWindow) {
        forward_bf16_amx(p, begin, end);
        break;
      }
#endif
      forward_impl<BF16>(p, begin, end);
      break;
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
