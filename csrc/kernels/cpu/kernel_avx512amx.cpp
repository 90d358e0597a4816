// The CPU core for AVX-512 + AVX512-BF16 + AMX-BF16 (Sapphire Rapids and later): the AVX-512
// build plus the bf16 forward on AMX tiles (core/bf16_amx.h). Picked by dispatch.cpp when the
// processor has them and Linux grants the AMX tile state (RSIR_CPU_ISA=avx512 caps it).
#define RSIR_CPU_BUILD avx512amx
#define RSIR_CPU_TARGET "avx2,fma,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16"
#define RSIR_WIDE_VECTORS 2  // 32 registers of 512 bits: 8 x 32 tiles
#define RSIR_AMX_BF16 1
#include "kernels/cpu/isa_unit.h"
