"""The attention ops that traced and exported graphs of this package hold, by qualified name:
what deployment tooling maps (rsir_kernels.onnx's translation table, rsir_kernels.flops'
handles). One list, so that a renamed op is renamed here once.

Each backend's forward op: (q, k, v, index, window_size, scale) -> (out, lse), q (B, L, H, D).
The packed op: (qkv, index, window_size, scale, backend) -> (out, lse), qkv (B, L, 3, H, D).
"""
import torch

FORWARD_OPS = ("rsir_ext::window_attention_fwd",       # cpp (the ops library)
               "rsir::window_attention",               # reference
               "rsir::window_attention_triton")        # triton
PACKED_OPS = ("rsir::window_attention_qkvpacked",)


def registered(qualname: str) -> bool:
    """Whether this process has the op (a backend not installed registers none)."""
    try:
        torch._C._get_schema(qualname, "")
        return True
    except RuntimeError:
        return False


def overload(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default
