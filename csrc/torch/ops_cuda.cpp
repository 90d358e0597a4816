// CUDA implementations of the rsir_ext ops (built only when the extension has CUDA): tensor
// checks, device guard, the caller's current stream, then the torch-free launchers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels/cuda/window_attention_cuda.h"
#include "params_from_tensors.h"

namespace rsir_ext {
namespace {

void check_cuda_inputs(const at::Tensor& q, int64_t window_size) {
  TORCH_CHECK(q.is_cuda(), "rsir_ext: the CUDA kernel got tensors on ", q.device());
  TORCH_CHECK(q.scalar_type() != at::kDouble, "rsir_ext: the CUDA kernels run float16, bfloat16, float32, not float64");
  TORCH_CHECK(q.size(3) <= rsir::cuda::kMaxHeadDim, "rsir_ext: the CUDA kernels take head dim <= ",
              rsir::cuda::kMaxHeadDim, ", got ", q.size(3));
  TORCH_CHECK(std::min(window_size, q.size(1)) <= rsir::cuda::kMaxWindow, "rsir_ext: the CUDA kernels take window <= ",
              rsir::cuda::kMaxWindow, ", got ", window_size);
  TORCH_CHECK(q.size(0) <= rsir::cuda::kMaxGridYZ, "rsir_ext: the CUDA kernels take batch <= ", rsir::cuda::kMaxGridYZ,
              " (grid z), got ", q.size(0));
  TORCH_CHECK(q.size(2) <= rsir::cuda::kMaxGridYZ, "rsir_ext: the CUDA kernels take heads <= ", rsir::cuda::kMaxGridYZ,
              " (grid y), got ", q.size(2));
}

std::tuple<at::Tensor, at::Tensor> forward_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& index, int64_t window_size, double scale) {
  check_qkv(q, k, v, index, window_size, scale);
  check_cuda_inputs(q, window_size);
  const c10::cuda::CUDAGuard guard(q.device());
  rsir::WindowAttentionParams p = make_params(q, k, v, index, window_size, scale);
  auto outputs = forward_outputs(p, q, /*zeroed=*/true);  // unvisited tokens: 0
  if (q.numel() == 0) return outputs;
  const cudaError_t err = rsir::cuda::launch_forward(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "rsir_ext: forward kernel launch failed: ", cudaGetErrorString(err));
  return outputs;
}

at::Tensor backward_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& index, int64_t window_size, double scale) {
  check_qkv(q, k, v, index, window_size, scale);
  check_backward(dout, q);
  check_cuda_inputs(q, window_size);
  const c10::cuda::CUDAGuard guard(q.device());
  rsir::WindowAttentionParams p = make_params(q, k, v, index, window_size, scale);
  at::Tensor dqkv = backward_outputs(p, dout, q, /*zeroed=*/true);
  if (q.numel() == 0) return dqkv;
  const cudaError_t err = rsir::cuda::launch_backward(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "rsir_ext: backward kernel launch failed: ", cudaGetErrorString(err));
  return dqkv;
}

}  // namespace
}  // namespace rsir_ext

TORCH_LIBRARY_IMPL(rsir_ext, CUDA, m) {
  m.impl("window_attention_fwd", &rsir_ext::forward_cuda);
  m.impl("window_attention_bwd", &rsir_ext::backward_cuda);
}
