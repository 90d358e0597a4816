"""The attention ops that traced and exported graphs of this package hold, by qualified name:
what deployment tooling maps (rsir_kernels.onnx's translation table, rsir_kernels.flops'
handles). One list, so that a renamed op is renamed here once.

Each backend's forward op: (q, k, v, index, window_size, scale) -> (out, lse), q (B, L, H, D)
(a packed qkv reaches them as three views; rsir_kernels.autograd_functions).
"""
import torch

FORWARD_OPS = ("rsir_ext::window_attention_fwd",       # cpp (the ops library)
               "rsir::window_attention",               # reference
               "rsir::window_attention_triton")        # triton


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
