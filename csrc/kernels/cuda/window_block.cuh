// What every block (w, h, b) of the CUDA kernels (window_attention.cu) shares: the dtype
// conversions, warp reductions, the shared-memory layout, and the prologue that loads the
// window's token ids (enter_block) and stages key / value tiles (stage_tiles).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "rsir/params.h"

namespace rsir::cuda {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kSmemBudget = 48 * 1024;  // no opt-in needed on any GPU

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <class T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ int64_t row_offset(const int64_t* s, int64_t b, int64_t t, int64_t h) {
  return b * s[0] + t * s[1] + h * s[2];
}

// Shared-memory layout (floats unless said), the same for every kernel:
//   tok[N] (int), lse[N], delta[N], linv[N], tileA[tk][D+1], tileB[tk][D+1], then per warp:
//   rowA[D], rowB[D], bufA[tk], bufB[tk].
struct Layout {
  int tk;
  size_t bytes;
};

__host__ __device__ inline size_t smem_bytes(int n, int d, int tk) {
  return sizeof(float) * (4 * (size_t)n + 2 * (size_t)tk * (d + 1) + (size_t)kWarps * (2 * d + 2 * tk));
}

inline Layout pick_layout(int n, int d) {
  int tk = (n + 7) / 8 * 8;
  while (tk > 8 && smem_bytes(n, d, tk) > (size_t)kSmemBudget) tk -= 8;
  return {tk, smem_bytes(n, d, tk)};
}

struct Smem {
  int* tok;
  float *lse, *delta, *linv, *tileA, *tileB, *rowA, *rowB, *bufA, *bufB;
};

__device__ inline Smem carve(float* base, int n, int d, int tk, int warp) {
  Smem s;
  s.tok = reinterpret_cast<int*>(base);
  s.lse = base + n;
  s.delta = s.lse + n;
  s.linv = s.delta + n;
  s.tileA = s.linv + n;
  s.tileB = s.tileA + (size_t)tk * (d + 1);
  float* w = s.tileB + (size_t)tk * (d + 1) + (size_t)warp * (2 * d + 2 * tk);
  s.rowA = w;
  s.rowB = w + d;
  s.bufA = w + 2 * d;
  s.bufB = w + 2 * d + tk;
  return s;
}

// Token ids of window w (index values outside 0..L-1 become -1); returns the window's length.
__device__ inline int load_tokens(const WindowAttentionParams& p, int* tok, int64_t b, int64_t g, int64_t w) {
  const int64_t start = w * p.N;
  const int n = (int)min((int64_t)p.N, p.L - start);
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t off = b * p.index_stride[0] + g * p.index_stride[1] + (start + j) * p.index_stride[2];
    const int64_t t = p.index_bytes == 4 ? (int64_t) static_cast<const int32_t*>(p.index)[off]
                                         : static_cast<const int64_t*>(p.index)[off];
    tok[j] = (t >= 0 && t < p.L) ? (int)t : -1;
  }
  return n;
}

// tile[r][d] = x[b, tok[j0 + r], h, d] as float (rows of invalid tokens: 0).
template <class T>
__device__ inline void load_tile(float* tile, const T* x, const int64_t* s, const int* tok, int j0, int rows,
                                 int64_t b, int64_t h, int d_) {
  for (int e = threadIdx.x; e < rows * d_; e += blockDim.x) {
    const int r = e / d_, d = e % d_;
    const int t = tok[j0 + r];
    tile[r * (d_ + 1) + d] = t >= 0 ? to_f(x[row_offset(s, b, t, h) + d * s[3]]) : 0.0f;
  }
}

template <class T>
__device__ inline void load_row(float* row, const T* x, const int64_t* s, int t, int64_t b, int64_t h, int d_) {
  for (int d = threadIdx.x & 31; d < d_; d += 32) row[d] = to_f(x[row_offset(s, b, t, h) + d * s[3]]);
}

// A block's coordinates and its window, as both kernels start: the window's token ids in sm.tok
// (n of them, loaded by the whole block), `tiles` tiles of tk rows over them, `rounds` rounds of
// one row per warp.
struct Block {
  int64_t w, h, b;
  int D, warp, lane, n, tiles, rounds;
  Smem sm;
};

__device__ __forceinline__ Block enter_block(const WindowAttentionParams& p, float* smem, int tk) {
  Block k;
  k.w = blockIdx.x, k.h = blockIdx.y, k.b = blockIdx.z;
  const int64_t g = k.h / (p.H / p.G);
  k.D = (int)p.D, k.warp = threadIdx.x / 32, k.lane = threadIdx.x & 31;
  const int nmax = (int)min(p.N, p.L);
  k.sm = carve(smem, nmax, k.D, tk, k.warp);
  k.n = load_tokens(p, k.sm.tok, k.b, g, k.w);
  __syncthreads();
  k.tiles = (k.n + tk - 1) / tk;
  k.rounds = (k.n + kWarps - 1) / kWarps;
  return k;
}

// Rows j0 .. j0 + rows - 1 of the window from x into tileA and from y into tileB, for round r:
// a window of one tile is staged once (round 0) and kept; barriers before (the last readers of
// the tiles) and after (the loads).
template <class T>
__device__ __forceinline__ void stage_tiles(const Block& k, int r, int j0, int rows, const T* x, const int64_t* sx,
                                            const T* y, const int64_t* sy) {
  if (k.tiles > 1 || r == 0) {
    __syncthreads();
    load_tile(k.sm.tileA, x, sx, k.sm.tok, j0, rows, k.b, k.h, k.D);
    load_tile(k.sm.tileB, y, sy, k.sm.tok, j0, rows, k.b, k.h, k.D);
  }
  __syncthreads();
}

}  // namespace rsir::cuda
