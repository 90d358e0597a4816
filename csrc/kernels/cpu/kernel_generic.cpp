// The CPU core for the baseline instruction set of the target (SSE2 on x86-64, NEON on aarch64).
#define RSIR_CPU_BUILD generic
#define RSIR_WIDE_VECTORS 0  // 16 vector registers of 128 bits: 4 x 8 tiles
#include "kernels/cpu/isa_unit.h"
