// The CPU kernels compiled for AVX-512 (F, BW, DQ, VL) + FMA + AVX512-BF16 + AMX-BF16 (Sapphire
// Rapids and later): kernel_avx512.cpp's build, plus the bf16 forward on AMX tiles
// (kernel_bf16_amx.h). Chosen at run time by dispatch.cpp when the processor has all of them and
// Linux grants the process the AMX tile state (RSIR_CPU_ISA=avx512 caps the choice at the plain
// AVX-512 build).
// Same structure as kernel_avx512.cpp: standard headers, then the target pragma, then the
// kernels in a namespace of their own.
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
#if defined(__clang__) ? __clang_major__ >= 12 : __GNUC__ >= 11
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16")
#define RSIR_WIDE_VECTORS 2  // 32 registers of 512 bits: 8 x 32 tiles
#define RSIR_AMX_BF16 1

namespace rsir {
namespace cpu {
namespace avx512amx {

#include "kernel_impl.h"

extern const bool kCompiled = true;
void forward(const WindowAttentionParams& p, int64_t begin, int64_t end) { forward_entry(p, begin, end); }
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end) { backward_entry(p, begin, end); }

}  // namespace avx512amx
}  // namespace cpu
}  // namespace rsir

#pragma GCC pop_options
#else  // a compiler without AMX intrinsics: the build is never picked (dispatch.cpp reads kCompiled)
namespace rsir {
namespace cpu {
namespace avx512amx {
extern const bool kCompiled = false;
void forward(const WindowAttentionParams&, int64_t, int64_t) {}
void backward(const WindowAttentionParams&, int64_t, int64_t) {}
}  // namespace avx512amx
}  // namespace cpu
}  // namespace rsir
#endif
#endif
