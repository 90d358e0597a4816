// The CPU core's forward, one work item (batch, group, window) after another: gather, S = Q K^T,
// softmax, O = P V, scatter (bf16_amx.h: the AMX build's bf16 variant).
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
#include "kernels/cpu/core/softmax.h"
#include "kernels/cpu/core/staged.h"
#include "kernels/cpu/core/types.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

// The forward's prefetches for a work item: its rows of q, k, v, and of out unless out is
// written with streaming stores.
template <class T>
static inline auto forward_prefetch(const WindowAttentionParams& p, bool out_rows) {
  return [&p, out_rows](const ItemTokens& t, PrefetchQueue& pq) {
    const int64_t hpg = p.heads_per_group(), h0 = t.g * hpg;
    prefetch_rows(static_cast<const T*>(p.q), p.q_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    prefetch_rows(static_cast<const T*>(p.k), p.k_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    prefetch_rows(static_cast<const T*>(p.v), p.v_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
    if (out_rows) prefetch_rows(static_cast<const T*>(p.out), p.out_stride, t.b, h0, hpg, t.tok, t.m, p.D, pq);
  };
}

template <class T>
static void forward_impl(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  using A = typename Elem<T>::acc;  // compute type, also the lse type
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t dp = round_up(D, PAD), wp = round_up(imin(p.N, p.L), PAD);
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  A* lse = static_cast<A*>(p.lse);

  const int64_t qcap = prefetch_queue_cap<T>(wp, hpg, D, 4);
  const int64_t bytes = 64 * 8 + ring_bytes<T>(wp, hpg, D, 4) +
                        4 * round_up(wp * dp * (int64_t)sizeof(A), 64) +
                        round_up(wp * wp * (int64_t)sizeof(A), 64) + round_up(wp * (int64_t)sizeof(A), 64) +
                        round_up(wp * 8, 64) + Staged<T>::bytes(wp, hpg, D);
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  char* const matrices = cursor;
  A* Q = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* KT = carve<A>(cursor, dp * wp);  // rows d, cols j
  A* V = carve<A>(cursor, wp * dp);   // rows j, cols d
  A* O = carve<A>(cursor, wp * dp);   // rows i, cols d
  A* S = carve<A>(cursor, wp * wp);   // scores, then probabilities
  zero_padding(matrices, cursor);
  A* inv = carve<A>(cursor, wp);
  // Large outputs whose rows are whole lines: fp32 rows streamed per head, 2-byte rows staged.
  Staged<T> staged(cursor, identity_rows(cursor, wp), wp, hpg, D);
#if RSIR_WIDE_VECTORS == 2
  bool stream_out = false, stage_out = false;
  if constexpr (sizeof(T) == 4 && sizeof(A) == 4) stream_out = streams(out, p.out_stride, p, 1, 4);
  if constexpr (sizeof(T) == 2) stage_out = streams(out, p.out_stride, p, hpg, 2);
#else
  const bool stream_out = false, stage_out = false;
#endif

  auto ring = make_ring(p, cursor, wp, qcap, begin, end, forward_prefetch<T>(p, !stream_out && !stage_out));
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, PAD);
    if constexpr (sizeof(A) == 4) {
      // float: scores transposed (ST = K Q^T: keys down, queries across), the softmax's max and
      // sum run down the columns (softmax_cols), then O = (P^T)^T V.
      const int64_t pk = ring.per_step(hpg * (mp / VL) * m);  // prefetches per exp vector
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        transpose(KT, mp, Q, dp, m, D);             // Q^T: rows d, cols i
        gather_rows(V, dp, k, p.k_stride, b, h, tok, m, D);  // K rows
        gemm(S, mp, V, dp, KT, mp, m, mp, D);       // ST = K Q^T: rows j, cols i
        gather_rows(V, dp, v, p.v_stride, b, h, tok, m, D);
        A* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
        softmax_cols(
            S, m, mp, p.scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; },
            [&] { ring.pump(pk); });
        gemm_t(O, dp, S, mp, V, dp, m, dp, m);  // O = P V with P^T stored
#if RSIR_WIDE_VECTORS == 2
        if (stream_out) {
          stream_rows(reinterpret_cast<float*>(out), p.out_stride, b, h, O, dp, tok, m, D, inv, 1.0f);
          continue;
        }
#endif
        if (stage_out)  // out rows = O / column sum
          staged.put(hh, O, dp, m, D, inv, (A)1);
        else
          scatter_rows(out, p.out_stride, b, h, O, dp, tok, m, D, inv, (A)1);
      }
#if RSIR_WIDE_VECTORS == 2
      if (stage_out) staged.flush(out, p.out_stride, b, g * hpg, tok, m);
#endif
    } else {  // double: rows of scores, softmax_rows
      const int64_t pk = ring.per_step(hpg * m);  // prefetches per softmax row
      for (int64_t hh = 0; hh < hpg; ++hh) {
        const int64_t h = g * hpg + hh;
        gather_rows(Q, dp, q, p.q_stride, b, h, tok, m, D);
        gather_rows(O, dp, k, p.k_stride, b, h, tok, m, D);  // K rows (O is free until P V)
        transpose(KT, mp, O, dp, m, D);
        gather_rows(V, dp, v, p.v_stride, b, h, tok, m, D);
        gemm(S, mp, Q, dp, KT, mp, m, mp, D);  // S = Q K^T
        A* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
        softmax_rows(
            S, m, mp, p.scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; },
            [&] { ring.pump(pk); });
        gemm(O, dp, S, mp, V, dp, m, dp, m);  // O = P V
        scatter_rows(out, p.out_stride, b, h, O, dp, tok, m, D, inv, (A)1);  // out rows = O / rowsum
      }
    }
  }
#if RSIR_WIDE_VECTORS == 2
  if (stream_out || stage_out) _mm_sfence();  // streaming stores are weakly ordered: visible before we return
#endif
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
