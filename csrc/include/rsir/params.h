// The kernel contract of rsir_kernels: a plain struct of pointers, int64 strides and sizes.
// No torch types: the CPU and CUDA cores build with plain g++ / nvcc from this header alone;
// only csrc/torch/ turns at::Tensor into a WindowAttentionParams.
//
// Shapes (docs/design.md section 1):
//   q, k, v, out, dout, dq, dk, dv   (B, L, H, D)  any strides, in elements
//   index                            (B, G, L)     int32 or int64, any strides
//   lse                              (B, H, L)     float32 (float64 for float64 inputs)
// Window w of group g holds the tokens index[b, g, w*N : min((w+1)*N, L)]; heads
// g*H/G .. (g+1)*H/G - 1 use group g. out / lse / gradients are written in the original
// token order. Index values outside 0..L-1 are absent slots for every kernel: neither read
// as a key nor written (wrong numbers, never an out-of-bounds access).
#pragma once

#include <cstdint>

namespace rsir {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct WindowAttentionParams {
  DType dtype = DType::kFloat32;  // of q, k, v, out, dout and the gradients
  int64_t B = 0, L = 0, H = 0, D = 0;
  int64_t G = 1;                  // head groups (G divides H)
  int64_t N = 1;                  // window size (tokens per window)
  double scale = 1.0;             // softmax scale

  // Inputs, strides (batch, token, head, dim) in elements.
  const void* q = nullptr;  int64_t q_stride[4] = {0, 0, 0, 0};
  const void* k = nullptr;  int64_t k_stride[4] = {0, 0, 0, 0};
  const void* v = nullptr;  int64_t v_stride[4] = {0, 0, 0, 0};

  // index (B, G, L), strides (batch, group, position) in elements.
  const void* index = nullptr;
  int32_t index_bytes = 8;        // 4: int32, 8: int64
  int64_t index_stride[3] = {0, 0, 0};

  // Forward only: out (B, L, H, D) and lse (B, H, L) written (no backward reads them).
  void* out = nullptr;      int64_t out_stride[4] = {0, 0, 0, 0};
  void* lse = nullptr;      int64_t lse_stride[3] = {0, 0, 0};  // float, or double for kFloat64

  // Backward only: dout in, dq / dk / dv out (usually views of one packed (B, L, 3, H, D)).
  const void* dout = nullptr; int64_t dout_stride[4] = {0, 0, 0, 0};
  void* dq = nullptr;         int64_t dq_stride[4] = {0, 0, 0, 0};
  void* dk = nullptr;         int64_t dk_stride[4] = {0, 0, 0, 0};
  void* dv = nullptr;         int64_t dv_stride[4] = {0, 0, 0, 0};

  // ceil(L / N) without forming L + N - 1 (N may be any int64, e.g. INT64_MAX: one window)
  // CPU core, optional (B, G, L) bytes, zero before the call: a window of group g visiting
  // token t sets visits[(b * G + g) * L + t] to 1 (see kernels/cpu/visits.h). nullptr: not
  // recorded.
  uint8_t* visits = nullptr;

  int64_t num_windows() const { return N > 0 && L > 0 ? L / N + (L % N != 0) : 0; }
  int64_t heads_per_group() const { return G > 0 ? H / G : 0; }
};

}  // namespace rsir
