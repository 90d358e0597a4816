// The GEMM micro-kernel of the CPU core: register tiles of C = A B (gemm) and C = A^T B (gemm_t)
// on the scratch matrices, and their transposes.
#pragma once

#include <cstdint>
#if RSIR_WIDE_VECTORS == 2
#include <immintrin.h>
#endif

#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/types.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

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

}  // namespace rsir::cpu::RSIR_CPU_BUILD
