// The softmax's gradient in the CPU core's backward: P recomputed from the scores as the forward
// made it (softmax.h), then dS = P * (dP - delta), down the columns (float) or rows (double).
#pragma once

#include <cmath>
#include <cstdint>

#include "kernels/cpu/core/config.h"
#include "kernels/cpu/core/softmax.h"
#include "kernels/cpu/core/vectors.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

// Backward, rows i < m (P and dS 0 beyond column m), P recomputed exactly as the forward's:
//   e_ij = 2^((sigma S_ij - M_i) |scale| log2(e)), P_ij = e_ij / sum_j e_ij,
//   delta_i = sum_j P_ij dP_ij / sum_j P_ij, dS <- P * (dP - delta_i).
// delta comes from the very P that dS uses, in the accumulation type, so each row of dS sums to
// zero up to its rounding; normalised by P's row sum, so that a large common part of dP (v with
// a large mean) cancels exactly instead of leaving (sum - 1) * dP. FlashAttention's
// delta_i = dO_i . O_i reads O rounded to the input dtype: at a saturated softmax (P near
// one-hot) dS cancels and that rounding alone put fp16 / bf16 dq beyond 2x the same-precision
// reference's error (docs/design.md section 9). Neither O nor lse is read.
//
// delta is refined once: d0 = the rounded delta, c = sum_j e_j (dP_ij - d0) / sum_j e_j (its
// rounding error, up to an ulp or two of delta), dS = P * ((dP - d0) - c). At a saturated row
// (P_max = 1 - eps) dP_max - delta = sum_{j != max} P_j (dP_max - dP_j) ~ eps |dP|: one ulp of
// delta is a relative error of ulp / (eps |dP|) in dS_max, 2e-4 at eps = 6e-4 (fuzz case
// cpp:generic:7604, 5x the fp32 reference's error there). dP_max - d0 is exact (Sterbenz), so c
// and dS_max keep the relative accuracy of their terms.

// Backward on transposed scores (float), as softmax_cols: PT[j * mp + i] = q_i . k_j and
// dST[j * mp + i] = dO_i . v_j for keys j < m (rows), queries i < mp (columns); per query
// (one lane), down its column, the steps above: e_j, sum e, sum e dP, delta refined
// once; PT <- P^T, dST <- dS^T. Sums over j in order: deterministic.
template <bool kNeg, class Pump>
static inline void grad_cols_signed(float* PT, float* dST, int64_t m, int64_t mp, double scale, Pump pump) {
  const ScaleSplit sc = split_scale(scale);
  for (int64_t c = 0; c < mp; c += VL) {
    float* pc = PT + c;
    float* dc = dST + c;
    VF mx0 = VF{} - __builtin_inff(), mx1 = mx0;
    int64_t j = 0;
    for (; j + 1 < m; j += 2) {
      const VF x0 = signed_load<kNeg>(pc + j * mp), x1 = signed_load<kNeg>(pc + (j + 1) * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
      mx1 = mx1 > x1 ? mx1 : x1;
    }
    if (j < m) {
      const VF x0 = signed_load<kNeg>(pc + j * mp);
      mx0 = mx0 > x0 ? mx0 : x0;
    }
    const VF mx = mx0 > mx1 ? mx0 : mx1;
    VF acc = VF{}, esum = VF{};
    for (j = 0; j < m; ++j) {
      pump();
      const VF e = exp2_approx_v((signed_load<kNeg>(pc + j * mp) - mx) * sc.scale2);
      vstore(pc + j * mp, e);
      acc += e * vload<VF>(dc + j * mp);
      esum += e;
    }
    const VF inv = 1.0f / esum, d0 = acc * inv;  // esum >= 1: the column max gives 2^0
    VF corr = VF{};
    for (j = 0; j < m; ++j) corr += vload<VF>(pc + j * mp) * (vload<VF>(dc + j * mp) - d0);
    corr *= inv;
    for (j = 0; j < m; ++j) {
      const VF pv = vload<VF>(pc + j * mp) * inv;
      vstore(pc + j * mp, pv);
      vstore(dc + j * mp, pv * ((vload<VF>(dc + j * mp) - d0) - corr));
    }
  }
}
template <class Pump>
static inline void grad_cols(float* PT, float* dST, int64_t m, int64_t mp, double scale, Pump pump) {
  if (scale < 0)
    grad_cols_signed<true>(PT, dST, m, mp, scale, pump);
  else
    grad_cols_signed<false>(PT, dST, m, mp, scale, pump);
}

template <class Pump>
static inline void grad_rows(double* P, double* dS, int64_t m, int64_t mp, double scale, Pump pump) {
  const double sigma = scale < 0 ? -1.0 : 1.0, abs_scale = scale < 0 ? -scale : scale;
  for (int64_t i = 0; i < m; ++i) {
    pump();
    double* pr = P + i * mp;
    double* dr = dS + i * mp;
    double mx = -__builtin_inf();
    for (int64_t j = 0; j < m; ++j) mx = pr[j] * sigma > mx ? pr[j] * sigma : mx;
    double pdp_sum = 0.0, e_sum = 0.0;
    for (int64_t j = 0; j < mp; ++j) {
      pr[j] = j < m ? std::exp((pr[j] * sigma - mx) * abs_scale) : 0.0;
      pdp_sum += pr[j] * dr[j];
      e_sum += pr[j];
    }
    const double inv = 1.0 / e_sum, d0 = pdp_sum * inv;  // delta refined once, as in grad_cols
    double c = 0.0;
    for (int64_t j = 0; j < mp; ++j) c += pr[j] * (dr[j] - d0);
    c *= inv;
    for (int64_t j = 0; j < mp; ++j) {
      pr[j] *= inv;
      dr[j] = pr[j] * ((dr[j] - d0) - c);
    }
  }
}

}  // namespace rsir::cpu::RSIR_CPU_BUILD
