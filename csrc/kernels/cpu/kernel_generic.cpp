// The CPU kernels for the baseline instruction set of the target (SSE2 on x86-64, NEON on
// aarch64). See kernel_impl.h.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "rsir/params.h"
#include "window_attention_cpu.h"

#if defined(__GNUC__)
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors only in inlined static helpers
#endif

#define RSIR_WIDE_VECTORS 0  // 16 vector registers of 128 bits: 4 x 8 tiles

namespace rsir {
namespace cpu {
namespace generic {

#include "kernel_impl.h"

void forward(const WindowAttentionParams& p, int64_t begin, int64_t end) { forward_entry(p, begin, end); }
void backward(const WindowAttentionParams& p, int64_t begin, int64_t end) { backward_entry(p, begin, end); }

}  // namespace generic
}  // namespace cpu
}  // namespace rsir
