// Output rows staged per work item and written as whole cache lines (streaming stores, AVX-512).
#pragma once

#include <cstdint>
#if RSIR_WIDE_VECTORS == 2
#include <immintrin.h>
#endif

#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/rows.h"
#include "kernels/cpu/core/scratch.h"
#include "kernels/cpu/core/types.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

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

}  // namespace rsir::cpu::RSIR_CPU_BUILD
