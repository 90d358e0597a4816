// Addressing of the CPU core: a work item's tokens from the index, and the gathers and scatters
// of their rows between the (B, L, H, D) tensors and the scratch matrices (streaming stores for
// large outputs on AVX-512).
#pragma once

#include <cstdint>
#include <cstring>
#if RSIR_WIDE_VECTORS == 2
#include <immintrin.h>
#endif

#include "rsir/params.h"
#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/types.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

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

}  // namespace rsir::cpu::RSIR_CPU_BUILD
