"""rsir_kernels: fused RS-Win / IR-Win window attention for the RSIR Transformer.

    import rsir_kernels as rk
    out = rk.window_attention(q, k, v, index, window_size=49)   # q, k, v (B, L, H, D)
    index = rk.rs_index(B, 56, 56, 7, groups=1)                  # RS-Win order (B, 1, L)
    attn = rk.RSIRAttention(dim=64, num_heads=4)                 # drop-in module
    model = rk.models.rsir_tiny()                                # or timm.create_model("rsir_tiny")
"""
from ._library import library_path
from .ops import available_backends, window_attention, window_attention_qkvpacked
from .samplers import ir_index, rs_index, window_order
from .modules import RSIRAttention, RSIRBlock
from . import models

models.timm_registry.register_when_timm_imported()  # timm.create_model("rsir_tiny"), timm optional

__version__ = "0.1.0"

__all__ = ["window_attention", "window_attention_qkvpacked", "rs_index", "ir_index", "window_order",
           "RSIRAttention", "RSIRBlock", "available_backends", "models", "library_path", "__version__"]
