"""The `triton` backend (placeholder until the fused kernels land)."""
from .. import Backend, register

register(Backend(name="triton", forward_op="rsir::window_attention_triton",
                 backward_op="rsir::window_attention_triton_backward", priority={"cuda": 30},
                 unavailable="the fused Triton kernels are not built yet"))
