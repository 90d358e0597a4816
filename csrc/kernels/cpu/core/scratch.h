// Carving the per-thread scratch into the kernels' matrices (64-byte aligned blocks).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/types.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

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

}  // namespace rsir::cpu::RSIR_CPU_BUILD
