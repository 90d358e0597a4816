// Torch-free CUDA core of the window attention: launchers on a WindowAttentionParams and the
// caller's stream. fp32, fp16, bf16 inputs (fp32 accumulation), head dim D <= 128, window
// N <= 256. One thread block per (window, head, batch); the window's rows are staged in
// shared memory in tiles, each warp owns one query (forward, dq) or one key (dk, dv) row at a
// time. No atomics: every output row is written by exactly one warp, so results are
// deterministic.
#pragma once

#include <cuda_runtime_api.h>

#include "rsir/params.h"

namespace rsir {
namespace cuda {

constexpr int kMaxHeadDim = 128;
constexpr int kMaxWindow = 256;
// The grid is (windows, H, B): gridDim.y and .z are at most 65535, gridDim.x 2^31 - 1.
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxWindows = 0x7fffffff;

// Both return cudaSuccess, cudaErrorInvalidValue for inputs outside the limits above (or
// float64), or the launch error. Rows of tokens no window visits (an index that is not a
// permutation) are not written: the binding allocates zero-filled outputs. A token visited
// twice gets the rows of one of its windows, which one unspecified (blocks race).
cudaError_t launch_forward(const WindowAttentionParams& p, cudaStream_t stream);
cudaError_t launch_backward(const WindowAttentionParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace rsir
