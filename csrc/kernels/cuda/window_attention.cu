// CUDA kernels of the window attention (see window_attention_cuda.h).
//
// Block (w, h, b): the window's token ids go to shared memory (invalid index values become
// -1 and are skipped). Keys (and values) are staged in shared-memory tiles of `tk` rows,
// padded to D + 1 floats per row so that lanes reading different rows hit different banks.
// A warp takes one query row at a time: lane l scores keys l, l + 32, ... of the tile,
// online softmax across tiles (max / sum by warp shuffles), and lane l accumulates output
// dims l, l + 32, ... (DPL = ceil(D / 32) per lane). The backward runs the same loop three
// times: per query row for delta, then for dq (keys and values tiled), per key row for dk and
// dv (queries and output gradients tiled), recomputing P from the saved log-sum-exp with the
// score rounded as the forward rounded it (__fmul_rn: a contracted fma(s, scale, -lse) would
// make the row maximum's P differ from 1 by the product's rounding error, large at large scores).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/window_attention_cuda.h"
#include "kernels/cuda/window_block.cuh"

namespace rsir {
namespace cuda {
namespace {

// ---------------------------------------------------------------- forward

template <class T, int DPL>
__global__ void __launch_bounds__(kThreads) forward_kernel(const WindowAttentionParams p, int tk) {
  extern __shared__ float smem_f[];
  const Block blk = enter_block(p, smem_f, tk);
  const int64_t h = blk.h, b = blk.b;
  const int D = blk.D, warp = blk.warp, lane = blk.lane, n = blk.n, tiles = blk.tiles, rounds = blk.rounds;
  const Smem& sm = blk.sm;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const float scale = (float)p.scale;
  for (int r = 0; r < rounds; ++r) {
    const int i = r * kWarps + warp;
    const int ti = i < n ? sm.tok[i] : -1;
    if (ti >= 0) load_row(sm.rowA, q, p.q_stride, ti, b, h, D);
    float m = -INFINITY, l = 0.0f, acc[DPL];
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[c] = 0.0f;
    for (int t = 0; t < tiles; ++t) {
      const int j0 = t * tk, rows = min(tk, n - j0);
      stage_tiles(blk, r, j0, rows, k, p.k_stride, v, p.v_stride);
      if (ti < 0) continue;  // warp-uniform
      float tmax = -INFINITY;
      for (int jj = lane; jj < rows; jj += 32) {
        float s = -INFINITY;
        if (sm.tok[j0 + jj] >= 0) {
          const float* kr = sm.tileA + jj * (D + 1);
          float dot = 0.0f;
          for (int d = 0; d < D; ++d) dot = fmaf(sm.rowA[d], kr[d], dot);
          s = dot * scale;
        }
        sm.bufA[jj] = s;
        tmax = fmaxf(tmax, s);
      }
      tmax = warp_max(tmax);
      if (tmax == -INFINITY) continue;  // no valid key in this tile
      const float m_new = fmaxf(m, tmax);
      const float corr = expf(m - m_new);  // 0 on the first tile
      float psum = 0.0f;
      for (int jj = lane; jj < rows; jj += 32) {
        const float e = expf(sm.bufA[jj] - m_new);
        sm.bufA[jj] = e;
        psum += e;
      }
      l = l * corr + warp_sum(psum);
      m = m_new;
      __syncwarp();
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        float a = acc[c] * corr;
        if (d < D)
          for (int jj = 0; jj < rows; ++jj) a = fmaf(sm.bufA[jj], sm.tileB[jj * (D + 1) + d], a);
        acc[c] = a;
      }
      __syncwarp();
    }
    if (ti >= 0) {
      T* o = static_cast<T*>(p.out) + row_offset(p.out_stride, b, ti, h);
      const float inv = 1.0f / l;
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D) o[d * p.out_stride[3]] = from_f<T>(acc[c] * inv);
      }
      if (lane == 0)
        static_cast<float*>(p.lse)[b * p.lse_stride[0] + h * p.lse_stride[1] + ti * p.lse_stride[2]] = m + logf(l);
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------- backward

template <class T, int DPL>
__global__ void __launch_bounds__(kThreads) backward_kernel(const WindowAttentionParams p, int tk) {
  extern __shared__ float smem_f[];
  const Block blk = enter_block(p, smem_f, tk);
  const int64_t h = blk.h, b = blk.b;
  const int D = blk.D, warp = blk.warp, lane = blk.lane, n = blk.n, tiles = blk.tiles, rounds = blk.rounds;
  const Smem& sm = blk.sm;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const float scale = (float)p.scale;

  // Phase 0, per query row i (a warp each; K in tileA, V in tileB): the softmax's max m_i and
  // sum l_i recomputed from the scores, as the forward took them (sm.lse holds m_i, sm.linv
  // 1 / l_i: P_ij = exp(x_ij - m_i) / l_i; the saved lse = m + log(l) is not read, since its
  // one rounding is an absolute error of ulp(m) in every exponent, large at large scores), and
  // delta_i = sum_j P_ij dP_ij / sum_j P_ij in fp32, as the CPU core and Triton take it:
  // FlashAttention's rowsum(dO * O) reads O rounded to the input dtype, which alone put fp16 /
  // bf16 dq beyond 2x the same-precision reference at a saturated softmax. Online over the key
  // tiles: each lane keeps its own max and rescales its sums, the warp then merges them.
  for (int r = 0; r < rounds; ++r) {
    const int i = r * kWarps + warp;
    const int ti = i < n ? sm.tok[i] : -1;
    if (ti >= 0) {
      load_row(sm.rowA, q, p.q_stride, ti, b, h, D);
      load_row(sm.rowB, dout, p.dout_stride, ti, b, h, D);
    }
    float m = -INFINITY, psum = 0.0f, pdp = 0.0f;
    for (int t = 0; t < tiles; ++t) {
      const int j0 = t * tk, rows = min(tk, n - j0);
      stage_tiles(blk, r, j0, rows, k, p.k_stride, v, p.v_stride);
      if (ti < 0) continue;
      __syncwarp();
      for (int jj = lane; jj < rows; jj += 32) {
        if (sm.tok[j0 + jj] < 0) continue;
        const float* kr = sm.tileA + jj * (D + 1);
        const float* vr = sm.tileB + jj * (D + 1);
        float s = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; ++d) {
          s = fmaf(sm.rowA[d], kr[d], s);
          dp = fmaf(sm.rowB[d], vr[d], dp);
        }
        const float x = __fmul_rn(s, scale);  // the forward's rounding of the score
        if (x > m) {  // a new lane maximum: rescale what this lane summed so far
          const float corr = expf(m - x);  // 0 while m = -inf
          psum *= corr;
          pdp *= corr;
          m = x;
        }
        const float e = expf(x - m);
        psum += e;
        pdp = fmaf(e, dp, pdp);
      }
    }
    const float mrow = warp_max(m);
    const float corr = m == -INFINITY ? 0.0f : expf(m - mrow);
    psum = warp_sum(psum * corr);
    pdp = warp_sum(pdp * corr);
    if (ti >= 0 && lane == 0) {
      sm.lse[i] = mrow;
      sm.linv[i] = 1.0f / psum;
      sm.delta[i] = pdp / psum;
    }
    __syncwarp();
  }
  __syncthreads();

  // Phase 1: dq_i = scale * sum_j dS_ij k_j (warp per query i; K in tileA, V in tileB).
  for (int r = 0; r < rounds; ++r) {
    const int i = r * kWarps + warp;
    const int ti = i < n ? sm.tok[i] : -1;
    if (ti >= 0) {
      load_row(sm.rowA, q, p.q_stride, ti, b, h, D);
      load_row(sm.rowB, dout, p.dout_stride, ti, b, h, D);
    }
    float acc[DPL];
#pragma unroll
    for (int c = 0; c < DPL; ++c) acc[c] = 0.0f;
    for (int t = 0; t < tiles; ++t) {
      const int j0 = t * tk, rows = min(tk, n - j0);
      stage_tiles(blk, r, j0, rows, k, p.k_stride, v, p.v_stride);
      if (ti < 0) continue;
      __syncwarp();
      for (int jj = lane; jj < rows; jj += 32) {
        float ds = 0.0f;
        if (sm.tok[j0 + jj] >= 0) {
          const float* kr = sm.tileA + jj * (D + 1);
          const float* vr = sm.tileB + jj * (D + 1);
          float s = 0.0f, dp = 0.0f;
          for (int d = 0; d < D; ++d) {
            s = fmaf(sm.rowA[d], kr[d], s);
            dp = fmaf(sm.rowB[d], vr[d], dp);
          }
          const float pij = expf(__fmul_rn(s, scale) - sm.lse[i]) * sm.linv[i];
          ds = pij * (dp - sm.delta[i]);
        }
        sm.bufA[jj] = ds;
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D)
          for (int jj = 0; jj < rows; ++jj) acc[c] = fmaf(sm.bufA[jj], sm.tileA[jj * (D + 1) + d], acc[c]);
      }
      __syncwarp();
    }
    if (ti >= 0) {
      T* dq = static_cast<T*>(p.dq) + row_offset(p.dq_stride, b, ti, h);
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D) dq[d * p.dq_stride[3]] = from_f<T>(acc[c] * scale);
      }
    }
    __syncwarp();
  }

  // Phase 2: dk_j = scale * sum_i dS_ij q_i, dv_j = sum_i P_ij dO_i (warp per key j; Q in
  // tileA, dO in tileB).
  for (int r = 0; r < rounds; ++r) {
    const int j = r * kWarps + warp;
    const int tj = j < n ? sm.tok[j] : -1;
    __syncthreads();  // every warp is done with rowA / rowB of phase 1 or the previous round
    if (tj >= 0) {
      load_row(sm.rowA, k, p.k_stride, tj, b, h, D);
      load_row(sm.rowB, v, p.v_stride, tj, b, h, D);
    }
    float dk_acc[DPL], dv_acc[DPL];
#pragma unroll
    for (int c = 0; c < DPL; ++c) dk_acc[c] = dv_acc[c] = 0.0f;
    for (int t = 0; t < tiles; ++t) {
      const int i0 = t * tk, rows = min(tk, n - i0);
      stage_tiles(blk, r, i0, rows, q, p.q_stride, dout, p.dout_stride);
      if (tj < 0) continue;
      __syncwarp();
      for (int ii = lane; ii < rows; ii += 32) {
        float pij = 0.0f, ds = 0.0f;
        if (sm.tok[i0 + ii] >= 0) {
          const float* qr = sm.tileA + ii * (D + 1);
          const float* gr = sm.tileB + ii * (D + 1);
          float s = 0.0f, dp = 0.0f;
          for (int d = 0; d < D; ++d) {
            s = fmaf(qr[d], sm.rowA[d], s);
            dp = fmaf(gr[d], sm.rowB[d], dp);
          }
          pij = expf(__fmul_rn(s, scale) - sm.lse[i0 + ii]) * sm.linv[i0 + ii];
          ds = pij * (dp - sm.delta[i0 + ii]);
        }
        sm.bufA[ii] = pij;
        sm.bufB[ii] = ds;
      }
      __syncwarp();
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D)
          for (int ii = 0; ii < rows; ++ii) {
            dv_acc[c] = fmaf(sm.bufA[ii], sm.tileB[ii * (D + 1) + d], dv_acc[c]);
            dk_acc[c] = fmaf(sm.bufB[ii], sm.tileA[ii * (D + 1) + d], dk_acc[c]);
          }
      }
      __syncwarp();
    }
    if (tj >= 0) {
      T* dk = static_cast<T*>(p.dk) + row_offset(p.dk_stride, b, tj, h);
      T* dv = static_cast<T*>(p.dv) + row_offset(p.dv_stride, b, tj, h);
#pragma unroll
      for (int c = 0; c < DPL; ++c) {
        const int d = lane + 32 * c;
        if (d < D) {
          dk[d * p.dk_stride[3]] = from_f<T>(dk_acc[c] * scale);
          dv[d * p.dv_stride[3]] = from_f<T>(dv_acc[c]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- launch

template <class T, int DPL, bool Fwd>
cudaError_t launch_typed(const WindowAttentionParams& p, cudaStream_t stream) {
  const int nmax = (int)(p.N < p.L ? p.N : p.L);
  const Layout lay = pick_layout(nmax, (int)p.D);
  const dim3 grid((unsigned)p.num_windows(), (unsigned)p.H, (unsigned)p.B);
  if (Fwd)
    forward_kernel<T, DPL><<<grid, kThreads, lay.bytes, stream>>>(p, lay.tk);
  else
    backward_kernel<T, DPL><<<grid, kThreads, lay.bytes, stream>>>(p, lay.tk);
  return cudaGetLastError();
}

template <class T, bool Fwd>
cudaError_t launch_dpl(const WindowAttentionParams& p, cudaStream_t stream) {
  switch ((p.D + 31) / 32) {
    case 1: return launch_typed<T, 1, Fwd>(p, stream);
    case 2: return launch_typed<T, 2, Fwd>(p, stream);
    case 3: return launch_typed<T, 3, Fwd>(p, stream);
    default: return launch_typed<T, 4, Fwd>(p, stream);
  }
}

template <bool Fwd>
cudaError_t launch(const WindowAttentionParams& p, cudaStream_t stream) {
  if (p.D < 1 || p.D > kMaxHeadDim || p.N < 1 || (p.N < p.L ? p.N : p.L) > kMaxWindow || p.G < 1 ||
      p.H % p.G != 0 || p.H > kMaxGridYZ || p.B > kMaxGridYZ || p.num_windows() > kMaxWindows)
    return cudaErrorInvalidValue;
  if (p.B == 0 || p.L == 0 || p.H == 0) return cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: return launch_dpl<float, Fwd>(p, stream);
    case DType::kFloat16: return launch_dpl<__half, Fwd>(p, stream);
    case DType::kBFloat16: return launch_dpl<__nv_bfloat16, Fwd>(p, stream);
    default: return cudaErrorInvalidValue;  // float64: not supported on CUDA
  }
}

}  // namespace

cudaError_t launch_forward(const WindowAttentionParams& p, cudaStream_t stream) { return launch<true>(p, stream); }
cudaError_t launch_backward(const WindowAttentionParams& p, cudaStream_t stream) { return launch<false>(p, stream); }

}  // namespace cuda
}  // namespace rsir
