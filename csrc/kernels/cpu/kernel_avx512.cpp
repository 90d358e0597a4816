// The CPU kernels compiled for AVX-512 (F, BW, DQ, VL) + FMA (x86-64 with GCC or Clang:
// Skylake-SP, Ice Lake, Zen 4 and later), chosen at run time by dispatch.cpp when the processor
// has all of them (RSIR_CPU_ISA=avx2 or =generic forces a narrower build). Standard headers
// come first, then the target pragma, so that only this file's own functions (in their own
// namespace) use AVX-512: no inline function compiled for AVX-512 can be picked by the linker
// for the other builds.
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include "rsir/params.h"
#include "window_attention_cpu.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64/128-byte vectors only in inlined static helpers
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_ps in the intrinsics
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")
#define RSIR_WIDE_VECTORS 2  // 32 registers of 512 bits: 8 x 32 tiles

namespace rsir {
namespace cpu {
namespace avx512 {

#include "kernel_impl.h"

void forward(const WindowAttentionParams& p, int64_t begin, int64_t end) { forward_entry(p, begin, end); }
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end) { backward_entry(p, begin, end); }

}  // namespace avx512
}  // namespace cpu
}  // namespace rsir

#pragma GCC pop_options
#endif
