// The CPU core for AVX-512 (F, BW, DQ, VL) + FMA (Skylake-SP, Ice Lake, Zen 4 and later), picked
// by dispatch.cpp when the processor has all of them (RSIR_CPU_ISA=avx2 or generic caps it).
#define RSIR_CPU_BUILD avx512
#define RSIR_CPU_TARGET "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl"
#define RSIR_WIDE_VECTORS 2  // 32 registers of 512 bits: 8 x 32 tiles
#include "kernels/cpu/isa_unit.h"
