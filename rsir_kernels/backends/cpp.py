"""The `cpp` backend (placeholder until the C++/CUDA extension lands)."""
from . import Backend, register

register(Backend(name="cpp", forward_op="rsir_ext::window_attention_fwd",
                 backward_op="rsir_ext::window_attention_bwd", priority={"cpu": 20, "cuda": 20},
                 unavailable="the C++/CUDA extension is not built yet"))
