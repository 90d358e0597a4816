// The CPU core for AVX2 + FMA (x86-64 with GCC or Clang: Haswell, Zen and later), picked by
// dispatch.cpp when the processor has both.
#define RSIR_CPU_BUILD avx2
#define RSIR_CPU_TARGET "avx2,fma"
#define RSIR_WIDE_VECTORS 1  // 16 registers of 256 bits: 4 x 16 tiles
#include "kernels/cpu/isa_unit.h"
