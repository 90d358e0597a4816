// An index that is not a permutation (check_index=False), after a pass that recorded
// p.visits (docs/design.md section 1: the contract of every backend):
//   a token that no window of group g visits gets out = 0 (lse = -inf, the log of an empty
//   sum) in the forward, dq = dk = dv = 0 in the backward, for the heads of group g;
//   a token visited more than once: settle_visits reports it, and the caller reruns the pass
//   on one thread in item order, so the token's rows are those of its last window (in window
//   order), deterministically.
// Header-only: included by the torch binding and the core's unit tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "rsir/params.h"

namespace rsir {
namespace cpu {

inline int64_t element_bytes(DType t) {
  return t == DType::kFloat64 ? 8 : t == DType::kFloat32 ? 4 : 2;
}

// x[b, t, h, :] = 0 (all-zero bits are 0 in every dtype); s: strides in elements.
inline void zero_row(void* x, const int64_t* s, int64_t b, int64_t t, int64_t h, int64_t D, int64_t esize) {
  char* row = static_cast<char*>(x) + (b * s[0] + t * s[1] + h * s[2]) * esize;
  if (s[3] == 1) {
    std::memset(row, 0, (size_t)(D * esize));
  } else {
    for (int64_t d = 0; d < D; ++d) std::memset(row + d * s[3] * esize, 0, (size_t)esize);
  }
}

// Zeroes the rows of unvisited tokens (forward: out, and lse = -inf; backward: dq, dk, dv).
// Returns true when some token was visited more than once (the caller reruns serially): the
// row (b, g) of the index holds more valid entries than distinct visited tokens. (Counting
// here keeps the kernels' marks plain stores, not read-modify-write atomics.)
inline bool settle_visits(const WindowAttentionParams& p, bool backward) {
  if (!p.visits) return false;
  const int64_t esize = element_bytes(p.dtype), hpg = p.heads_per_group();
  bool again = false;
  for (int64_t bg = 0; bg < p.B * p.G; ++bg) {
    const uint8_t* row = p.visits + bg * p.L;
    const int64_t b = bg / p.G, g = bg % p.G;
    int64_t valid = 0, visited = 0;
    for (int64_t pos = 0; pos < p.L; ++pos) {
      const int64_t off = b * p.index_stride[0] + g * p.index_stride[1] + pos * p.index_stride[2];
      const int64_t t = p.index_bytes == 4 ? (int64_t) static_cast<const int32_t*>(p.index)[off]
                                           : static_cast<const int64_t*>(p.index)[off];
      valid += t >= 0 && t < p.L;
    }
    for (int64_t t = 0; t < p.L; ++t) {
      visited += row[t];
      if (row[t]) continue;
      for (int64_t h = g * hpg; h < (g + 1) * hpg; ++h) {
        if (backward) {
          zero_row(p.dq, p.dq_stride, b, t, h, p.D, esize);
          zero_row(p.dk, p.dk_stride, b, t, h, p.D, esize);
          zero_row(p.dv, p.dv_stride, b, t, h, p.D, esize);
        } else {
          zero_row(p.out, p.out_stride, b, t, h, p.D, esize);
          const int64_t off = b * p.lse_stride[0] + h * p.lse_stride[1] + t * p.lse_stride[2];
          if (p.dtype == DType::kFloat64)
            static_cast<double*>(p.lse)[off] = -std::numeric_limits<double>::infinity();
          else
            static_cast<float*>(p.lse)[off] = -std::numeric_limits<float>::infinity();
        }
      }
    }
    again = again || valid > visited;
  }
  return again;
}

}  // namespace cpu
}  // namespace rsir
