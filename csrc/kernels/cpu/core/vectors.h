// The vector width of the build (VL, PAD) and its GCC/Clang vector types.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels/cpu/core/config.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

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

}  // namespace rsir::cpu::RSIR_CPU_BUILD
