// The forward softmax of the CPU core: the vectorised exp2 (and ln for AVX-512), and the softmax
// of a window's scores, down the columns of S^T (float) or along the rows of S (double).
#pragma once

#include <cmath>
#include <cstdint>
#if RSIR_WIDE_VECTORS == 2
#include <immintrin.h>
#endif

#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/types.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

// 2^y on VL lanes: y = n + f with n = round(y) and f in [-1/2, 1/2] exact, 2^f by its
// degree-6 Taylor polynomial (relative error ~1.2e-7), 2^n into the exponent bits. Exactly 0
// below -126 (and for -inf); NaN in, NaN out; y <= 0 (every caller passes a softmax exponent,
// score - column max, rounded: never above 0). The softmax folds log2(e) into the scale, so no
// range reduction by ln 2 is needed (about 5 % faster forward than Cephes expf).
static inline VF exp2_approx_v(VF y) {
  const VF lo = VF{} - 126.0f;
  VF yc = y;
#if RSIR_WIDE_VECTORS == 2
  // AVX-512: n by one rounding instruction, 2^n applied by vscalefps (poly * 2^n, rounded once:
  // the same bits as the multiply below); y < -126 is selected to 0 at the end either way.
  const VF n = _mm512_roundscale_ps(yc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VF f = yc - n;
#else
  yc = yc < lo ? lo : yc;
  const VF magic = VF{} + 12582912.0f;
  const VF t = yc + magic;  // rounds to the nearest integer
  const VF n = t - magic;
  const VF f = yc - n;
  const VI ni = (VI)t - 0x4b400000;
#endif
  VF poly = VF{} + 1.5403530393381609e-4f;
  poly = poly * f + 1.3333558146428443e-3f;
  poly = poly * f + 9.6181291076284772e-3f;
  poly = poly * f + 5.5504108664821580e-2f;
  poly = poly * f + 2.4022650695910071e-1f;
  poly = poly * f + 6.9314718055994531e-1f;
  poly = poly * f + 1.0f;
#if RSIR_WIDE_VECTORS == 2
  const VF res = _mm512_scalef_ps(poly, n);
#else
  const VF res = poly * (VF)((ni + 127) << 23);
#endif
  return y < lo ? VF{} : res;
}

// Softmax rows at any score magnitude. With sigma = sign(scale) (1 for scale 0), the row's
// exponents are taken as (sigma * S_ij - M_i) * |scale| with M_i = max_j sigma * S_ij: the
// difference is <= 0 and exact for the scores that matter (Sterbenz), so the row maximum
// gets exactly 2^0 = 1 and nothing can overflow. Scaling before subtracting (y = scale * S,
// then y - max y) would not do: with FMA, `y_j - y_max` contracts to fma(S_j, scale, -y_max),
// which differs from the rounded y that the max was taken of by up to half an ulp of y --
// 2^64 and more at |y| ~ 1e9, then inf * 0 = NaN.
//
// Forward, rows i < m of S (row stride mp, mp % 8 == 0):
//   S <- 2^((sigma * S - M_i) * |scale| * log2(e)) (0 beyond column m); inv[i] = 1 / row sum;
//   lse_i = |scale| * M_i + ln(sum) stored through lse_at(i).
// Float runs the same on transposed scores (softmax_cols, grad_cols: one lane per row i).
// The backward (grad_rows / grad_cols) recomputes M_i and the row sum from the same scores, so its P is
// the forward's P to the bit: no rebuild from the stored lse, whose rounding (an ulp of a
// number as large as the scores) would be a relative error of P at large scores.
struct ScaleSplit {
  float scale2;  // |scale| * log2(e)
  double abs_scale;
};
static inline ScaleSplit split_scale(double scale) {
  const double a = scale < 0 ? -scale : scale;
  return {(float)(a * 1.4426950408889634), a};
}

#if RSIR_WIDE_VECTORS == 2
// ln x on 16 lanes for the row sums (x in [1, 2^126): normal, positive; NaN in, NaN out):
// Cephes logf (x = 2^e * (1 + f), f in [sqrt(1/2) - 1, sqrt(2) - 1), degree-8 polynomial,
// ln 2 split in two), ~1e-7 relative, the accuracy of std::log in float.
static inline VF log_v(VF x) {
  const VI xi = (VI)x;
  VF e = __builtin_convertvector(((xi >> 23) & 0xff) - 126, VF);  // x = 2^e * mant, mant in [1/2, 1)
  VF mant = (VF)((xi & 0x007fffff) | 0x3f000000);
  const auto small = mant < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  const VF f = small ? (mant + mant) - 1.0f : mant - 1.0f;  // exact
  const VF z = f * f;
  VF y = VF{} + 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  VF r = f + y;
  r = r + e * 0.693359375f;
  return x == x ? r : x;
}

#endif


// Forward on transposed scores (float): ST[j * mp + i] = q_i . k_j for keys j < m (rows) and
// queries i < mp (columns; those >= m are padding queries whose results are dropped). Each
// query's max and sum run down its column: vertical vector operations across the rows, one
// lane per query, no horizontal reduction and no mask (the rows stop at m).
//   ST <- 2^((sigma * ST - M_i) * |scale| * log2(e)) for rows j < m; inv[i] = 1 / column sum;
//   lse_i = |scale| * M_i + ln(sum) stored through lse_at(i) for i < m.
// The sum over j runs in order (one accumulator per lane): deterministic. The max needs no
// order (exact), so two accumulators halve its dependency chain.
// sigma * x with sigma = -1 (kNeg) or 1 known at compile time: a negation or nothing, the
// same bits as the multiply (the softmaxes below are compiled for both signs of the scale).
template <bool kNeg>
static inline VF signed_load(const float* p) {
  const VF x = vload<VF>(p);
  return kNeg ? -x : x;
}

// block_ready(c) runs before column block c is read: the AMX path stores the scores of block c
// + VL there, one block ahead of their reads (AMX stores do not forward to vector loads).
struct NoBlockHook {
  void operator()(int64_t) const {}
};

template <bool kNeg, class LseAt, class Pump, class BlockHook>
static inline void softmax_cols_signed(float* ST, int64_t m, int64_t mp, double scale, float* inv, LseAt lse_at,
                                       Pump pump, BlockHook block_ready) {
  const ScaleSplit sc = split_scale(scale);
  for (int64_t c = 0; c < mp; c += VL) {
    block_ready(c);
    float* col = ST + c;
    VF mx0 = VF{} - __builtin_inff(), mx1 = mx0;
    int64_t j = 0;
    for (; j + 1 < m; j += 2) {
      const VF x0 = signed_load<kNeg>(col + j * mp), x1 = signed_load<kNeg>(col + (j + 1) * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
      mx1 = mx1 > x1 ? mx1 : x1;
    }
    if (j < m) {
      const VF x0 = signed_load<kNeg>(col + j * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
    }
    const VF mxn = mx0 > mx1 ? mx0 : mx1;  // a NaN score poisons its column's sum anyway
    VF vsum = VF{};
    for (j = 0; j < m; ++j) {
      pump();
      const VF e = exp2_approx_v((signed_load<kNeg>(col + j * mp) - mxn) * sc.scale2);
      vstore(col + j * mp, e);
      vsum += e;
    }
#if RSIR_WIDE_VECTORS == 2
    const VF l = mxn * (float)sc.abs_scale + log_v(vsum);
#else
    VF l;
    for (int w = 0; w < VL; ++w) l[w] = (float)(sc.abs_scale * mxn[w] + std::log((double)vsum[w]));
#endif
    vstore(inv + c, 1.0f / vsum);
    for (int64_t i = c; i < imin(m, c + VL); ++i) *lse_at(i) = l[i - c];
  }
}
template <class LseAt, class Pump, class BlockHook = NoBlockHook>
static inline void softmax_cols(float* ST, int64_t m, int64_t mp, double scale, float* inv, LseAt lse_at,
                                Pump pump, BlockHook block_ready = {}) {
  if (scale < 0)
    softmax_cols_signed<true>(ST, m, mp, scale, inv, lse_at, pump, block_ready);
  else
    softmax_cols_signed<false>(ST, m, mp, scale, inv, lse_at, pump, block_ready);
}

template <class LseAt, class Pump>
static inline void softmax_rows(double* S, int64_t m, int64_t mp, double scale, double* inv, LseAt lse_at, Pump pump) {
  const double sigma = scale < 0 ? -1.0 : 1.0, abs_scale = scale < 0 ? -scale : scale;
  for (int64_t i = 0; i < m; ++i) {
    pump();
    double* s = S + i * mp;
    double mx = -__builtin_inf();
    for (int64_t j = 0; j < m; ++j) mx = s[j] * sigma > mx ? s[j] * sigma : mx;
    double sum = 0;
    for (int64_t j = 0; j < m; ++j) {
      s[j] = std::exp((s[j] * sigma - mx) * abs_scale);
      sum += s[j];
    }
    for (int64_t j = m; j < mp; ++j) s[j] = 0;
    *lse_at(i) = abs_scale * mx + std::log(sum);
    inv[i] = 1.0 / sum;
  }
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
