// The CPU core's backward, one work item after another: P recomputed from the scores, dS, then
// dQ = dS K, dK = dS^T Q, dV = P^T dO (lse and out are not read).
#pragma once

#include <cstdint>
#if RSIR_WIDE_VECTORS == 2
#include <immintrin.h>
#endif

#include "rsir/params.h"
#include "kernels/cpu/window_attention_cpu.h"
#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/gemm.h"
#include "kernels/cpu/core/prefetch.h"
#include "kernels/cpu/core/rows.h"
#include "kernels/cpu/core/scratch.h"
#include "kernels/cpu/core/softmax_grad.h"
#include "kernels/cpu/core/staged.h"
#include "kernels/cpu/core/types.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

template <class T>
static void backward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, PAD), wp = round_up(imin(p.N, p.L), PAD);
  const A scale = (A)p.scale;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  T* dq = static_cast<T*>(p.dq);
  T* dk = static_cast<T*>(p.dk);
  T* dv = static_cast<T*>(p.dv);

  const int64_t mat = round_up(wp * dp * (int64_t)sizeof(A), 64);
  const int64_t qcap = prefetch_queue_cap<T>(wp, hpg, D, 7);
  const int64_t staging = Staged<T>::bytes(wp, hpg, D);
  const int64_t bytes = 64 * 8 + ring_bytes<T>(wp, hpg, D, 7) + 11 * mat +
                        2 * round_up(wp * wp * (int64_t)sizeof(A), 64) +
                        round_up(wp * (int64_t)sizeof(A), 64) + round_up(wp * 8, 64) + 3 * staging;
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  char* const matrices = cursor;
  A* Q = carve<A>(cursor, wp * dp);     // rows i, cols d
  A* K = carve<A>(cursor, wp * dp);     // rows j, cols d
  A* KT = carve<A>(cursor, dp * wp);    // rows d, cols j
  A* VT = carve<A>(cursor, dp * wp);    // rows d, cols j
  A* dO = carve<A>(cursor, wp * dp);    // rows i, cols d
  A* dQ = carve<A>(cursor, wp * dp);    // rows i, cols d
  A* dK = carve<A>(cursor, wp * dp);    // rows j, cols d
  A* dV = carve<A>(cursor, wp * dp);    // rows j, cols d
  A* P = carve<A>(cursor, wp * wp);     // rows i, cols j
  A* dS = carve<A>(cursor, wp * wp);    // dP, then dS
  A* Vr = carve<A>(cursor, wp * dp);    // rows j, cols d (float path)
  zero_padding(matrices, cursor);
  // Large outputs whose rows are whole lines: fp32 rows streamed per head, 2-byte rows staged.
  const int64_t* rows = identity_rows(cursor, wp);
  Staged<T> dQs(cursor, rows, wp, hpg, D), dKs(cursor, rows, wp, hpg, D), dVs(cursor, rows, wp, hpg, D);
#if RSIR_WIDE_VECTORS == 2
  bool stream_grads = false, stage_grads = false;
  auto all_stream = [&](int64_t heads, int64_t elem_bytes) {
    return streams(dq, p.dq_stride, p, heads, elem_bytes) && streams(dk, p.dk_stride, p, heads, elem_bytes) &&
           streams(dv, p.dv_stride, p, heads, elem_bytes);
  };
  if constexpr (sizeof(T) == 4 && sizeof(A) == 4) stream_grads = all_stream(1, 4);
  if constexpr (sizeof(T) == 2) stage_grads = all_stream(hpg, 2);
#else
  const bool stream_grads = false, stage_grads = false;
#endif

  auto ring = make_ring(p, cursor, wp, qcap, begin, end, [&](const ItemTokens& t, PrefetchQueue& pq) {
    const int64_t h0 = t.g * hpg;
    prefetch_rows(q, p.q_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(k, p.k_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(v, p.v_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    prefetch_rows(dout, p.dout_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    // the rows that scatter_rows writes: without this, their stores miss the cache (and, with
    // 4 KiB pages, the TLB) at the scatter (a prefetch measured as fast as prefetchw or faster)
    if (!stream_grads && !stage_grads) {
      prefetch_rows(dq, p.dq_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
      prefetch_rows(dk, p.dk_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
      prefetch_rows(dv, p.dv_stride, t.b, h0, hpg, t.tok, t.m, D, pq);
    }
  });
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, PAD);
    if constexpr (sizeof(A) == 4) {
      // float: scores and dP transposed (keys down, queries across), grad_cols down the columns.
      A* QT = KT;   // rows d, cols i
      A* dOT = VT;  // rows d, cols i
      const int64_t pk = ring.per_step(hpg * (mp / VL) * m);  // prefetches per exp vector
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        transpose(QT, mp, Q, dp, m, D);
        gather_rows(K, dp, k, p.k_stride, b, h, tok, m, D);
        gather_rows(Vr, dp, v, p.v_stride, b, h, tok, m, D);
        gather_rows(dO, dp, dout, p.dout_stride, b, h, tok, m, D);
        transpose(dOT, mp, dO, dp, m, D);
        gemm(P, mp, K, dp, QT, mp, m, mp, D);     // S^T = K Q^T
        gemm(dS, mp, Vr, dp, dOT, mp, m, mp, D);  // dP^T = V dO^T
        grad_cols(P, dS, m, mp, p.scale, [&] { ring.pump(pk); });  // P^T, dS^T
        gemm_t(dQ, dp, dS, mp, K, dp, m, dp, m);  // dQ = dS K
        gemm(dK, dp, dS, mp, Q, dp, m, dp, m);    // dK = dS^T Q
        gemm(dV, dp, P, mp, dO, dp, m, dp, m);    // dV = P^T dO
#if RSIR_WIDE_VECTORS == 2
        if (stream_grads) {
          stream_rows(reinterpret_cast<float*>(dq), p.dq_stride, b, h, dQ, dp, tok, m, D, nullptr, scale);
          stream_rows(reinterpret_cast<float*>(dk), p.dk_stride, b, h, dK, dp, tok, m, D, nullptr, scale);
          stream_rows(reinterpret_cast<float*>(dv), p.dv_stride, b, h, dV, dp, tok, m, D, nullptr, 1.0f);
          continue;
        }
#endif
        if (stage_grads) {
          dQs.put(hh, dQ, dp, m, D, (const A*)nullptr, scale);
          dKs.put(hh, dK, dp, m, D, (const A*)nullptr, scale);
          dVs.put(hh, dV, dp, m, D, (const A*)nullptr, (A)1);
          continue;
        }
        scatter_rows(dq, p.dq_stride, b, h, dQ, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dk, p.dk_stride, b, h, dK, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dv, p.dv_stride, b, h, dV, dp, tok, m, D, (const A*)nullptr, (A)1);
      }
#if RSIR_WIDE_VECTORS == 2
      if (stage_grads) {
        dQs.flush(dq, p.dq_stride, b, g * hpg, tok, m);
        dKs.flush(dk, p.dk_stride, b, g * hpg, tok, m);
        dVs.flush(dv, p.dv_stride, b, g * hpg, tok, m);
      }
#endif
    } else {  // double: rows of scores, grad_rows
      const int64_t pk = ring.per_step(hpg * m);  // prefetches per softmax row
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        gather_rows(K, dp, k, p.k_stride, b, h, tok, m, D);
        transpose(KT, mp, K, dp, m, D);
        gather_rows(dQ, dp, v, p.v_stride, b, h, tok, m, D);  // V rows (dQ is free until dS K)
        transpose(VT, mp, dQ, dp, m, D);
        gather_rows(dO, dp, dout, p.dout_stride, b, h, tok, m, D);
        gemm(P, mp, Q, dp, KT, mp, m, mp, D);    // S = Q K^T
        gemm(dS, mp, dO, dp, VT, mp, m, mp, D);  // dP = dO V^T
        grad_rows(P, dS, m, mp, p.scale, [&] { ring.pump(pk); });  // P = softmax(scale * S), dS = P * (dP - delta)
        gemm(dQ, dp, dS, mp, K, dp, m, dp, m);      // dQ = dS K
        gemm_t(dK, dp, dS, mp, Q, dp, m, dp, m);    // dK = dS^T Q
        gemm_t(dV, dp, P, mp, dO, dp, m, dp, m);    // dV = P^T dO
        scatter_rows(dq, p.dq_stride, b, h, dQ, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dk, p.dk_stride, b, h, dK, dp, tok, m, D, (const A*)nullptr, scale);
        scatter_rows(dv, p.dv_stride, b, h, dV, dp, tok, m, D, (const A*)nullptr, (A)1);
      }
    }
  }
#if RSIR_WIDE_VECTORS == 2
  if (stream_grads || stage_grads) _mm_sfence();  // streaming stores are weakly ordered: visible before we return
#endif
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
