// The torch binding: op schemas (TORCH_LIBRARY(rsir_ext)) and the CPU implementations, built
// into the ops library (no Python: docs/design.md section 12). The CUDA implementations
// are in ops_cuda.cpp (built only with CUDA).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels/cpu/visits.h"
#include "kernels/cpu/window_attention_cpu.h"
#include "params_from_tensors.h"

namespace rsir_ext {
namespace {

// The (B, G, L) visit marks of one pass (kernels/cpu/visits.h): what an index that is not a
// permutation leaves unvisited is zeroed after the pass, and a token visited twice is settled by
// a serial rerun. B * G * L bytes, against out's B * L * H * D elements for zero-filled outputs.
at::Tensor new_visits(rsir::WindowAttentionParams& p, const at::Tensor& q) {
  at::Tensor visits = at::zeros({p.B, p.G, p.L}, q.options().dtype(at::kByte));
  p.visits = visits.data_ptr<uint8_t>();
  return visits;
}

std::tuple<at::Tensor, at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                               const at::Tensor& index, int64_t window_size, double scale) {
  check_qkv(q, k, v, index, window_size, scale);
  TORCH_CHECK(q.device().is_cpu(), "rsir_ext: the CPU kernel got tensors on ", q.device());
  rsir::WindowAttentionParams p = make_params(q, k, v, index, window_size, scale);
  auto outputs = forward_outputs(p, q);
  if (q.numel() == 0) return outputs;
  const at::Tensor visits = new_visits(p, q);
  at::parallel_for(0, rsir::cpu::num_work_items(p), 1,
                   [&](int64_t begin, int64_t end) { rsir::cpu::run_forward(p, begin, end); });
  if (rsir::cpu::settle_visits(p, /*backward=*/false)) {  // a token in two windows: the last one wins
    p.visits = nullptr;
    rsir::cpu::run_forward(p, 0, rsir::cpu::num_work_items(p));
  }
  return outputs;
}

at::Tensor backward_cpu(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& index, int64_t window_size, double scale) {
  check_qkv(q, k, v, index, window_size, scale);
  check_backward(dout, q);
  TORCH_CHECK(q.device().is_cpu(), "rsir_ext: the CPU kernel got tensors on ", q.device());
  rsir::WindowAttentionParams p = make_params(q, k, v, index, window_size, scale);
  at::Tensor dqkv = backward_outputs(p, dout, q);
  if (q.numel() == 0) return dqkv;
  const at::Tensor visits = new_visits(p, q);
  at::parallel_for(0, rsir::cpu::num_work_items(p), 1,
                   [&](int64_t begin, int64_t end) { rsir::cpu::run_backward(p, begin, end); });
  if (rsir::cpu::settle_visits(p, /*backward=*/true)) {
    p.visits = nullptr;
    rsir::cpu::run_backward(p, 0, rsir::cpu::num_work_items(p));
  }
  return dqkv;
}

}  // namespace
}  // namespace rsir_ext

TORCH_LIBRARY(rsir_ext, m) {
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor index, int window_size, float scale)"
        " -> (Tensor, Tensor)");
  m.def("window_attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor index, int window_size,"
        " float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(rsir_ext, CPU, m) {
  m.impl("window_attention_fwd", &rsir_ext::forward_cpu);
  m.impl("window_attention_bwd", &rsir_ext::backward_cpu);
}
