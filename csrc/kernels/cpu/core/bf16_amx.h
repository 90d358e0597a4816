// The bf16 forward on AMX tiles (TDPBF16PS: 16 x 16 fp32 += 16 x 32 bf16 . 32 x 16 bf16 per
// instruction): the AMX build's (RSIR_AMX_BF16, kernel_avx512amx.cpp), called by entry.h. The rows stay bf16 as gathered (half the bytes of the widened path):
//   S^T = K Q^T on tiles (keys down, queries across),
//   the softmax down the columns in fp32 (softmax_cols, as the float path),
//   O^T = V^T P^T on tiles, with e = exp(...) rounded to bf16 (P V in bf16 is what the bf16
//   reference does too; the column sums, lse and 1 / sum stay fp32 of the unrounded e),
//   O^T transposed back to rows, divided by the sums and written to the tokens (where the
//   output is large and its rows whole lines: staged per group, then streaming stores).
// TDPBF16PS adds each pair of products to the fp32 accumulator in a fixed order, treats bf16
// subnormals as zero and flushes fp32 subnormal results (|x| < 2^-126) to zero: invisible next
// to the output's bf16 rounding unless a whole row is that small. Sums in a fixed order,
// whatever the thread: bitwise deterministic.
//
// Shapes: D <= 32 and windows of at most 64 tokens (every RSIR stage); others take the widened
// path (forward_impl<BF16>). Layouts (Pair = two bf16 in 32 bits, the even element low):
//   Kb [mp][Dk]    key rows, bf16 (Dk = D rounded to 2): the A tile of S^T (one per head of
//                  the group, Kb_heads)
//   Qp [mp][P16]   query rows as pairs of d (D2 = Dk / 2 pairs, P16 = 16)
//   QT [D2][mp]    Qp transposed (a 32-bit transpose): the B tile of S^T ("VNNI" layout; one
//                  per head, QT_heads)
//   Pp [mk/2][mp]  rows 2 jp, 2 jp + 1 of e^T interleaved (mk = m rounded to 32): the B tile of O^T
//   Vb [mk][16 * nd]  value rows, bf16; Vp the same as pairs of rows; VT [16 * nd][mk] = Vp
//                  transposed: V^T, the A tile of O^T (nd = ceil(D / 16) blocks of 16 dims)
#pragma once

#include <cstdint>
#include <cstring>
#include <immintrin.h>

#include "rsir/params.h"
#include "kernels/cpu/window_attention_cpu.h"
#include "kernels/cpu/core/config.h"
#if !RSIR_AMX_BF16
#error "bf16_amx.h is compiled in the AMX build only (RSIR_AMX_BF16)"
#endif
#include "kernels/cpu/core/forward.h"
#include "kernels/cpu/core/gemm.h"
#include "kernels/cpu/core/prefetch.h"
#include "kernels/cpu/core/rows.h"
#include "kernels/cpu/core/scratch.h"
#include "kernels/cpu/core/softmax.h"
#include "kernels/cpu/core/staged.h"
#include "kernels/cpu/core/types.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

// Padding keys (j >= m) are zero in Kb, Pp and V^T; padding queries are computed and dropped.

typedef uint32_t Pair;

// The tile instructions are asm statements that do not tell the compiler they touch memory:
// a barrier before the tile loads (after the buffers are written) and after the tile stores.
static inline void memory_barrier() { __asm__ volatile("" ::: "memory"); }

constexpr int64_t kAmxMaxDim = 32, kAmxMaxWindow = 64;

// Tile registers: 0 = A of S^T, 1 = B of S^T, 2 = C, 3 = A of O^T, 4 = B of O^T.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

static inline TileConfig amx_config(int64_t Dk) {
  TileConfig c;
  c.rows[0] = 16, c.colsb[0] = (uint16_t)(2 * Dk);  // 16 keys x Dk bf16
  c.rows[1] = (uint8_t)(Dk / 2), c.colsb[1] = 64;   // Dk / 2 pairs x 16 queries
  c.rows[2] = 16, c.colsb[2] = 64;                  // 16 x 16 fp32
  c.rows[3] = 16, c.colsb[3] = 64;                  // 16 dims x 32 keys
  c.rows[4] = 16, c.colsb[4] = 64;                  // 16 key pairs x 16 queries
  return c;
}

// 32 bf16 as 16 pairs: (lo[0], hi[0]), (lo[1], hi[1]), ... from 16 + 16 bf16 in one register
// (lo in the low 256 bits).
static inline __m512i interleave_halves(__m512i x) {
  const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(idx, x);
}

// rows[i * ld + d] = x[b, tok[i], h, d] (bf16 bits) for i < m, d < D; d in [D, pad) set to 0.
// D = 16 and 32 (RSIR's) as one unmasked vector move per row: a memcpy call per row costs more
// than the row, and masked stores defeat store forwarding into the tile loads.
static inline void gather_bf16(uint16_t* rows, int64_t ld, int64_t pad, const BF16* x, const int64_t* s,
                               int64_t b, int64_t h, const int64_t* tok, int64_t m, int64_t D) {
  const int64_t sd = s[3];
  for (int64_t i = 0; i < m; ++i) {
    const BF16* src = x + offset4(s, b, tok[i], h);
    uint16_t* dst = rows + i * ld;
    if (sd == 1 && D == 16 && pad == 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
    } else if (sd == 1 && D == 32 && pad == 32) {
      _mm512_storeu_si512(dst, _mm512_loadu_si512(src));
    } else if (sd == 1) {
      std::memcpy(dst, src, 2 * D);
      for (int64_t d = D; d < pad; ++d) dst[d] = 0;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[d] = src[d * sd].x;
      for (int64_t d = D; d < pad; ++d) dst[d] = 0;
    }
  }
}

static void forward_bf16_amx(const WindowAttentionParams& p, int64_t begin, int64_t end) {
  const int64_t D = p.D, hpg = p.heads_per_group();
  const int64_t Dk = round_up(D, 2), D2 = Dk / 2, nd = (D + 15) / 16, dv = 16 * nd;
  const int64_t wp = round_up(imin(p.N, p.L), PAD), wk = round_up(wp, 32);
  const BF16* q = static_cast<const BF16*>(p.q);
  const BF16* k = static_cast<const BF16*>(p.k);
  const BF16* v = static_cast<const BF16*>(p.v);
  BF16* out = static_cast<BF16*>(p.out);
  float* lse = static_cast<float*>(p.lse);

  const int64_t qcap = prefetch_queue_cap<BF16>(wp, hpg, D, 4);
  const int64_t bytes = 64 * 9 + ring_bytes<BF16>(wp, hpg, D, 4) + hpg * round_up(wp * Dk * 2, 64) +
                        round_up(wp * 16 * 4, 64) + hpg * round_up(D2 * wp * 4, 64) + round_up(wp * wp * 4, 64) +
                        round_up(wk / 2 * wp * 4, 64) + round_up(wk * dv * 2, 64) + round_up(wk / 2 * dv * 4, 64) +
                        round_up(dv * wk * 2, 64) + 2 * round_up(wp * dv * 4, 64) + round_up(wp * 4, 64) +
                        round_up(wp * 8, 64) + Staged<BF16>::bytes(wp, hpg, D);
  char* cursor = static_cast<char*>(thread_scratch(bytes));
  TileConfig* config = carve<TileConfig>(cursor, 1);
  uint16_t* Kb_heads = carve<uint16_t>(cursor, hpg * wp * Dk);
  Pair* Qp = carve<Pair>(cursor, wp * 16);
  Pair* QT_heads = carve<Pair>(cursor, hpg * D2 * wp);
  float* ST = carve<float>(cursor, wp * wp);
  Pair* Pp = carve<Pair>(cursor, wk / 2 * wp);
  uint16_t* Vb = carve<uint16_t>(cursor, wk * dv);
  Pair* Vp = carve<Pair>(cursor, wk / 2 * dv);
  uint16_t* VT = carve<uint16_t>(cursor, dv * wk);
  float* OT = carve<float>(cursor, dv * wp);
  float* O = carve<float>(cursor, wp * dv);
  float* inv = carve<float>(cursor, wp);
  const bool stream_out = streams(out, p.out_stride, p, hpg, 2);  // staged per group, streamed
  Staged<BF16> staged(cursor, identity_rows(cursor, wp), wp, hpg, D);
  *config = amx_config(Dk);
  memory_barrier();
  _tile_loadconfig(config);

  auto ring = make_ring(p, cursor, wp, qcap, begin, end, forward_prefetch<BF16>(p, !stream_out));
  for (int64_t item = begin; item < end; ++item) {
    const ItemTokens& it = ring.get(item);
    const int64_t* tok = it.tok;
    const int64_t b = it.b, g = it.g, m = it.m;
    if (m == 0) continue;
    const int64_t mp = round_up(m, PAD), mk = round_up(m, 32);
    const int64_t pk = ring.per_step(hpg * (mp / VL) * m);  // prefetches per exp vector
    std::memset(Vb + m * dv, 0, 2 * (mk - m) * dv);  // and zero values (their e is 0 too)
    // Q^T and the K rows of every head of the group first: a head's score tiles then load rows
    // stored long before (AMX loads wait for pending vector stores; forward -6 to -8%)
    for (int64_t hh = 0; hh < hpg; ++hh) {
      const int64_t h = g * hpg + hh;
      uint16_t* Kh = Kb_heads + hh * wp * Dk;
      std::memset(Kh + m * Dk, 0, 2 * (mp - m) * Dk);  // padding keys: zero scores, never read
      gather_bf16(reinterpret_cast<uint16_t*>(Qp), 32, Dk, q, p.q_stride, b, h, tok, m, D);
      transpose(reinterpret_cast<float*>(QT_heads + hh * D2 * wp), mp, reinterpret_cast<const float*>(Qp), 16, m,
                D2);  // bits only
      gather_bf16(Kh, Dk, Dk, k, p.k_stride, b, h, tok, m, D);
    }
    for (int64_t hh = 0; hh < hpg; ++hh) {
      const int64_t h = g * hpg + hh;
      const uint16_t* Kb = Kb_heads + hh * wp * Dk;
      const Pair* QT = QT_heads + hh * D2 * wp;
      memory_barrier();
      auto score_block = [&](int64_t ib) {  // ST = K Q^T, rows j, cols ib .. ib + 15
        _tile_loadd(1, QT + ib, 4 * mp);
        for (int64_t jb = 0; jb < mp; jb += 16) {
          _tile_loadd(0, Kb + jb * Dk, 2 * Dk);
          _tile_zero(2);
          _tile_dpbf16ps(2, 0, 1);
          _tile_stored(2, ST + jb * mp + ib, 4 * mp);
        }
        memory_barrier();
      };
      gather_bf16(Vb, dv, dv, v, p.v_stride, b, h, tok, m, D);
      for (int64_t jp = 0; jp < mk / 2; ++jp)  // V rows 2 jp, 2 jp + 1 interleaved, then V^T
        for (int64_t d = 0; d < dv; d += 16) {
          const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Vb + 2 * jp * dv + d));
          const __m256i hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Vb + (2 * jp + 1) * dv + d));
          _mm512_storeu_si512(Vp + jp * dv + d, interleave_halves(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)));
        }
      transpose(reinterpret_cast<float*>(VT), mk / 2, reinterpret_cast<const float*>(Vp), dv, mk / 2, dv);
      // V's rows first: by now the stores of K and Q^T are in L1 for the tile loads (AMX loads
      // wait for pending vector stores); the other score blocks one block ahead of the
      // softmax's reads (softmax_cols)
      score_block(0);
      float* lse_bh = lse + b * p.lse_stride[0] + h * p.lse_stride[1];
      softmax_cols(
          ST, m, mp, p.scale, inv, [&](int64_t i) { return lse_bh + tok[i] * p.lse_stride[2]; },
          [&] { ring.pump(pk); },
          [&](int64_t c) {
            if (c + 16 < mp) score_block(c + 16);
          });
      for (int64_t jp = 0; jp < mk / 2; ++jp)  // e^T rows 2 jp, 2 jp + 1 rounded to bf16, interleaved
        for (int64_t c = 0; c < mp; c += 16) {
          const __m512 e0 = 2 * jp < m ? _mm512_loadu_ps(ST + 2 * jp * mp + c) : _mm512_setzero_ps();
          const __m512 e1 = 2 * jp + 1 < m ? _mm512_loadu_ps(ST + (2 * jp + 1) * mp + c) : _mm512_setzero_ps();
          _mm512_storeu_si512(Pp + jp * mp + c, interleave_halves((__m512i)_mm512_cvtne2ps_pbh(e1, e0)));
        }
      memory_barrier();
      for (int64_t db = 0; db < dv; db += 16)  // OT = V^T P^T: rows d, cols i
        for (int64_t ib = 0; ib < mp; ib += 16) {
          _tile_zero(2);
          for (int64_t kb = 0; kb < mk; kb += 32) {
            _tile_loadd(3, VT + db * mk + kb, 2 * mk);
            _tile_loadd(4, Pp + kb / 2 * mp + ib, 4 * mp);
            _tile_dpbf16ps(2, 3, 4);
          }
          _tile_stored(2, OT + db * mp + ib, 4 * mp);
        }
      memory_barrier();
      transpose(O, dv, OT, mp, dv, m);  // O rows i, cols d
      if (stream_out)  // out rows = O / column sum
        staged.put(hh, O, dv, m, D, inv, 1.0f);
      else
        scatter_rows(out, p.out_stride, b, h, O, dv, tok, m, D, inv, 1.0f);
    }
    if (stream_out) staged.flush(out, p.out_stride, b, g * hpg, tok, m);
  }
  if (stream_out) _mm_sfence();  // streaming stores are weakly ordered: visible before we return
  _tile_release();
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
