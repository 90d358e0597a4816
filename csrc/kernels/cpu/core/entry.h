// The CPU core's entry points for one instruction set: forward_entry / backward_entry pick the
// kernel for the dtype (and, in the AMX build, the bf16 forward on tiles for small shapes).
// isa_unit.h wraps them as rsir::cpu::<build>::forward / backward for dispatch.cpp.
//
// Per work item (b, g, w) and per head h of group g:
//   gather the window's rows into per-thread scratch (compute type: float, or double for
//   double inputs; zero padding to multiples of PAD = 8, 16 with AVX-512; K (and V in the
//   backward) also transposed), then small GEMMs on register tiles (8 x 32 floats with
//   AVX-512, 4 x 16 with AVX2, 4 x 8 otherwise) written with GCC/Clang vector extensions, the
//   softmax with a vectorised exp (float: on transposed scores S^T = K Q^T, so each query's
//   max and sums run down its column as vertical vector operations: softmax_cols, grad_cols;
//   Q, dO transposed instead of K, V), and every output row written straight to its token. The
//   rows of the item kLookahead ahead are prefetched a few at a time during the current one
//   (random rows: otherwise every item waits on its cache misses).
#pragma once

#include <cstdint>

#include "rsir/params.h"
#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/backward.h"
#include "kernels/cpu/core/forward.h"
#include "kernels/cpu/core/types.h"
#if RSIR_AMX_BF16
#include "kernels/cpu/core/bf16_amx.h"
#endif

namespace rsir::cpu::RSIR_CPU_BUILD {

static void forward_entry(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: forward_impl<float>(p, begin, end); break;
    case DType::kFloat64: forward_impl<double>(p, begin, end); break;
    case DType::kFloat16: forward_impl<Half>(p, begin, end); break;
    case DType::kBFloat16:
#if RSIR_AMX_BF16
      if (p.D <= kAmxMaxDim && imin(p.N, p.L) <= kAmxMaxWindow) {
        forward_bf16_amx(p, begin, end);
        break;
      }
#endif
      forward_impl<BF16>(p, begin, end);
      break;
  }
}

static void backward_entry(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  switch (p.dtype) {
    case DType::kFloat32: backward_impl<float>(p, begin, end); break;
    case DType::kFloat64: backward_impl<double>(p, begin, end); break;
    case DType::kFloat16: backward_impl<Half>(p, begin, end); break;
    case DType::kBFloat16: backward_impl<BF16>(p, begin, end); break;
  }
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
