// at::Tensor -> rsir::WindowAttentionParams, and the checks shared by the CPU and CUDA ops.
// Only csrc/torch/ includes torch headers.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "rsir/params.h"

namespace rsir_ext {

inline rsir::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return rsir::DType::kFloat32;
    case at::kDouble: return rsir::DType::kFloat64;
    case at::kHalf: return rsir::DType::kFloat16;
    case at::kBFloat16: return rsir::DType::kBFloat16;
    default: TORCH_CHECK(false, "rsir_ext: q must be float16, bfloat16, float32 or float64, got ", t);
  }
  return rsir::DType::kFloat32;
}

inline at::ScalarType lse_scalar_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void copy_strides(int64_t* dst, const at::Tensor& t) {
  for (int64_t i = 0; i < t.dim(); ++i) dst[i] = t.stride(i);
}

// RSIR_POISON=1: outputs start as NaN (tests: an unwritten row shows up). Off: at::empty, or
// `fill` where the kernels leave unvisited tokens' rows unwritten (the CUDA ops: 0 for out
// and the gradients, -inf for lse).
inline bool poison_outputs() {
  const char* s = std::getenv("RSIR_POISON");
  return s && s[0] && std::strcmp(s, "0") != 0;
}

inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts, bool filled = false,
                             double fill = 0.0) {
  if (poison_outputs()) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), opts);
  return filled ? at::full(shape, fill, opts) : at::empty(shape, opts);
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                      int64_t window_size, double scale) {
  TORCH_CHECK(q.dim() == 4, "rsir_ext: q must be (B, L, H, D), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "rsir_ext: k and v must have q's shape ", q.sizes(),
              ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "rsir_ext: q, k, v must have one dtype");
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device() && index.device() == q.device(),
              "rsir_ext: q, k, v, index must be on one device");
  to_dtype(q.scalar_type());
  TORCH_CHECK(index.dim() == 3 && index.size(0) == q.size(0) && index.size(2) == q.size(1),
              "rsir_ext: index must be (B, G, L) = (", q.size(0), ", G, ", q.size(1), "), got ", index.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt || index.scalar_type() == at::kLong,
              "rsir_ext: index must be int32 or int64, got ", index.scalar_type());
  TORCH_CHECK(index.size(1) >= 1 && q.size(2) % index.size(1) == 0, "rsir_ext: index's group count ", index.size(1),
              " must divide the head count ", q.size(2));
  TORCH_CHECK(window_size >= 1, "rsir_ext: window_size must be >= 1, got ", window_size);
  TORCH_CHECK(std::isfinite(scale), "rsir_ext: scale must be finite");
}

inline rsir::WindowAttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& index, int64_t window_size, double scale) {
  rsir::WindowAttentionParams p;
  p.dtype = to_dtype(q.scalar_type());
  p.B = q.size(0);
  p.L = q.size(1);
  p.H = q.size(2);
  p.D = q.size(3);
  p.G = index.size(1);
  p.N = window_size < p.L ? window_size : (p.L > 0 ? p.L : 1);  // a window longer than L is all of L
  p.scale = scale;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  copy_strides(p.q_stride, q);
  copy_strides(p.k_stride, k);
  copy_strides(p.v_stride, v);
  p.index = index.data_ptr();
  p.index_bytes = index.scalar_type() == at::kInt ? 4 : 8;
  copy_strides(p.index_stride, index);
  return p;
}

inline void check_backward(const at::Tensor& dout, const at::Tensor& q) {
  TORCH_CHECK(dout.sizes() == q.sizes(), "rsir_ext: dout must have q's shape ", q.sizes(), ", got ", dout.sizes());
  TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "rsir_ext: dout must have q's dtype");
  TORCH_CHECK(dout.device() == q.device(), "rsir_ext: dout must be on q's device");
}

// The forward's outputs and their pointers/strides in p.
// zeroed: out = 0 and lse = -inf before the kernels run (for the CUDA ops, see new_output).
inline std::tuple<at::Tensor, at::Tensor> forward_outputs(rsir::WindowAttentionParams& p, const at::Tensor& q,
                                                          bool zeroed = false) {
  at::Tensor out = new_output(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous), zeroed);
  at::Tensor lse = new_output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(lse_scalar_type(q.scalar_type())),
                              zeroed, -std::numeric_limits<double>::infinity());
  p.out = out.data_ptr();
  copy_strides(p.out_stride, out);
  p.lse = lse.data_ptr();
  copy_strides(p.lse_stride, lse);
  return {out, lse};
}

// The backward's input dout and outputs in p; returns dqkv (B, L, 3, H, D) (zeroed: filled with 0).
// The backward reads no forward output: every kernel recomputes the softmax from the scores.
inline at::Tensor backward_outputs(rsir::WindowAttentionParams& p, const at::Tensor& dout, const at::Tensor& q,
                                   bool zeroed = false) {
  p.dout = dout.data_ptr();
  copy_strides(p.dout_stride, dout);
  at::Tensor dqkv = new_output({q.size(0), q.size(1), 3, q.size(2), q.size(3)}, q.options(), zeroed);
  const at::Tensor dq = dqkv.select(2, 0), dk = dqkv.select(2, 1), dv = dqkv.select(2, 2);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  copy_strides(p.dq_stride, dq);
  copy_strides(p.dk_stride, dk);
  copy_strides(p.dv_stride, dv);
  return dqkv;
}

}  // namespace rsir_ext
