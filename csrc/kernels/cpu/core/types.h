// Scalar helpers of the CPU core: integer rounding, fp16 / bf16 <-> float conversions, and the
// element types with their compute type (Elem).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/core/config.h"

namespace rsir::cpu::RSIR_CPU_BUILD {

static inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

static inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half <-> float (round to nearest even; NaN, inf and subnormals handled).
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0x1fu) return f32_from_bits(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    const float mag = (float)mant * 5.9604644775390625e-8f;  // mant * 2^-24
    return sign ? -mag : mag;
  }
  return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
}
static inline uint16_t float_to_half(float f) {
  // M. Maratyszcza's FP16 conversion (exact IEEE arithmetic, no -ffast-math).
  const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = f32_bits(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xff000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007c00u, mant_bits = bits & 0x00000fffu;
  return (uint16_t)((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : exp_bits + mant_bits));
}
static inline float bf16_to_float(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }
static inline uint16_t float_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);  // quiet NaN
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

struct Half { uint16_t x; };
struct BF16 { uint16_t x; };

// Element type -> compute type, load and store.
template <class T> struct Elem;
template <> struct Elem<float> {
  using acc = float;
  static inline float load(const float* p) { return *p; }
  static inline void store(float* p, float x) { *p = x; }
};
template <> struct Elem<double> {
  using acc = double;
  static inline double load(const double* p) { return *p; }
  static inline void store(double* p, double x) { *p = x; }
};
template <> struct Elem<Half> {
  using acc = float;
  static inline float load(const Half* p) { return half_to_float(p->x); }
  static inline void store(Half* p, float x) { p->x = float_to_half(x); }
};
template <> struct Elem<BF16> {
  using acc = float;
  static inline float load(const BF16* p) { return bf16_to_float(p->x); }
  static inline void store(BF16* p, float x) { p->x = float_to_bf16(x); }
};

}  // namespace rsir::cpu::RSIR_CPU_BUILD
