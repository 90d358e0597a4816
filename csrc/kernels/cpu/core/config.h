// The build contract of the CPU core (the headers of this folder). They are compiled once per
// instruction set, each time by one translation unit (kernel_<build>.cpp, through isa_unit.h),
// which defines
//   RSIR_CPU_BUILD     the build's namespace: the core lives in rsir::cpu::RSIR_CPU_BUILD, so no
//                      inline function or class is shared between instruction sets (no ODR
//                      mix-up at link time);
//   RSIR_WIDE_VECTORS  0: 128-bit registers (SSE2 / NEON), 1: 256-bit (AVX2), 2: AVX-512;
//   RSIR_AMX_BF16      1: the bf16 forward on AMX tiles (bf16_amx.h); 0 when left undefined.
// Where the target has FMA, `a * b + c` on vectors is contracted to it (GCC/Clang default).
#pragma once

#if !defined(RSIR_CPU_BUILD) || !defined(RSIR_WIDE_VECTORS)
#error "the CPU core is compiled through kernels/cpu/isa_unit.h (RSIR_CPU_BUILD, RSIR_WIDE_VECTORS)"
#endif
#if !defined(RSIR_AMX_BF16)
#define RSIR_AMX_BF16 0
#endif
