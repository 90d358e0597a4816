// The CPU kernels compiled for AVX2 + FMA (x86-64 with GCC or Clang: Haswell, Zen and later),
// chosen at run time by dispatch.cpp when the processor has both. Standard headers come first,
// then the target pragma, so that only this file's own functions (in their own namespace) use
// AVX2: no inline function compiled for AVX2 can be picked by the linker for the generic code.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "rsir/params.h"
#include "window_attention_cpu.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only in inlined static helpers
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define RSIR_WIDE_VECTORS 1  // 16 registers of 256 bits: 4 x 16 tiles

namespace rsir {
namespace cpu {
namespace avx2 {

#include "kernel_impl.h"

void forward(const WindowAttentionParams& p, int64_t begin, int64_t end) { forward_entry(p, begin, end); }
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end) { backward_entry(p, begin, end); }

}  // namespace avx2
}  // namespace cpu
}  // namespace rsir

#pragma GCC pop_options
#endif
