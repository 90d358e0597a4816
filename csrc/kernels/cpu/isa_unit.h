// The body of each translation unit of the CPU core (kernel_generic.cpp, kernel_avx2.cpp,
// kernel_avx512.cpp, kernel_avx512amx.cpp), which defines before including it:
//   RSIR_CPU_BUILD     the build's namespace (generic, avx2, avx512, avx512amx);
//   RSIR_CPU_TARGET    the `#pragma GCC target` string (absent: the baseline build, no pragma);
//   RSIR_WIDE_VECTORS, RSIR_AMX_BF16: see core/config.h.
// Every header the core includes from outside core/ comes first, then the target pragma, then the
// core: only the core's own functions (in their own namespace) are compiled for the target, and
// no inline function of a shared header compiled for AVX2 can be picked by the linker for the
// generic build. tests/test_csrc_layout.py checks that this list covers the core's includes.
// Defines rsir::cpu::RSIR_CPU_BUILD::forward / backward (and kCompiled in the AMX build), which
// dispatch.cpp declares and picks from at run time.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if RSIR_WIDE_VECTORS == 2 && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#include "rsir/params.h"
#include "kernels/cpu/window_attention_cpu.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64/128-byte vectors only in inlined static helpers
#if RSIR_WIDE_VECTORS == 2
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12: _mm512_undefined_ps in the intrinsics
#endif
#endif

#if !defined(RSIR_CPU_TARGET)
#define RSIR_CPU_COMPILES 1  // the baseline build: any compiler, any architecture
#elif !(defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)))
#define RSIR_CPU_COMPILES 0  // an x86 build elsewhere: nothing (dispatch.cpp names it only on x86)
#elif RSIR_AMX_BF16 && !(defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11)
#define RSIR_CPU_COMPILES 0  // no AMX intrinsics in this compiler: stubs below, never picked
#else
#define RSIR_CPU_COMPILES 1
#endif

#if RSIR_CPU_COMPILES
#if defined(RSIR_CPU_TARGET)
#define RSIR_PRAGMA(x) _Pragma(#x)
#define RSIR_TARGET_PRAGMA(t) RSIR_PRAGMA(GCC target(t))
#pragma GCC push_options
RSIR_TARGET_PRAGMA(RSIR_CPU_TARGET)
#endif

#include "kernels/cpu/core/entry.h"

namespace rsir::cpu::RSIR_CPU_BUILD {
#if RSIR_AMX_BF16
extern const bool kCompiled = true;
#endif
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end) { forward_entry(p, begin, end); }
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end) { backward_entry(p, begin, end); }
}  // namespace rsir::cpu::RSIR_CPU_BUILD

#if defined(RSIR_CPU_TARGET)
#pragma GCC pop_options
#endif

#elif RSIR_AMX_BF16 && defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
namespace rsir::cpu::RSIR_CPU_BUILD {  // dispatch.cpp reads kCompiled and never picks these
extern const bool kCompiled = false;
void forward(const WindowAttentionParams&, int64_t, int64_t) {}
void backward(const WindowAttentionParams&, int64_t, int64_t) {}
}  // namespace rsir::cpu::RSIR_CPU_BUILD
#endif
