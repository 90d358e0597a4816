"""The torch.library ops rsir::window_attention_triton and rsir::window_attention_triton_backward.

`torch.library.triton_op` on CUDA (Inductor launches the kernels from its generated code) and
`torch.library.custom_op` with `register_fake` under the interpreter (docs/design.md
section 6); `OP_KIND` says which. These are what traced graphs hold; plain eager calls run
launch.forward / backward instead (rsir_kernels.routing).
"""
from __future__ import annotations

import torch

from ..registry import register_fakes
from . import launch
from .config import BACKWARD_OP, FORWARD_OP, INTERPRET
from .kernels import window_attn_bwd_kernel, window_attn_fwd_kernel
from .launch import allocate_backward, allocate_forward
from .plans import backward_plan, forward_plan


def _static(sizes) -> tuple:
    """Plain ints from a traced tensor's sizes or strides (a SymInt is specialized: a guard)."""
    return tuple(int(x) for x in sizes)


def _traceable_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                       window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward through wrap_triton, which Inductor traces into its own generated code."""
    out, lse = allocate_forward(q)
    plan, _ = forward_plan.__wrapped__(_static(q.shape), _static(q.stride()), _static(k.stride()),
                                       _static(v.stride()), _static(index.shape), _static(index.stride()),
                                       _static(out.stride()), _static(lse.stride()), q.dtype, q.device,
                                       window_size, scale, None)
    if plan.grid[0]:
        wrap_triton(window_attn_fwd_kernel)[plan.grid](q, k, v, index, out, lse, *plan.args, **plan.constexprs)
    return out, lse


def _traceable_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        index: torch.Tensor, window_size: int, scale: float) -> torch.Tensor:
    dqkv = allocate_backward(q)
    plan, cfg = backward_plan.__wrapped__(_static(q.shape), _static(dout.stride()), _static(q.stride()),
                                          _static(k.stride()), _static(v.stride()), _static(index.shape),
                                          _static(index.stride()), _static(dqkv.stride()), q.dtype, q.device,
                                          window_size, scale, None)
    if plan.grid[0]:
        stats = dqkv if cfg.single else q.new_empty((q.shape[0], q.shape[2], q.shape[1], 4), dtype=torch.float32)
        wrap_triton(window_attn_bwd_kernel)[plan.grid](dout, q, k, v, index, dqkv, stats, *plan.args,
                                                       **plan.constexprs)
    return dqkv


# CUDA, compiled kernels: torch.library.triton_op, so that Inductor launches the kernels from
# its generated code (no opaque custom-op call in a compiled graph). Under the interpreter
# (CPU tensors) triton_op fails opcheck and torch.compile (it touches real storage under fake
# tensors: docs/design.md section 6), so there, and where torch lacks triton_op, the ops are
# torch.library.custom_op with register_fake. Plain eager calls run launch.forward / backward
# either way (rsir_kernels.routing), with the direct launch.
OP_KIND = ("triton_op" if not INTERPRET and torch.cuda.is_available() and hasattr(torch.library, "triton_op")
           else "custom_op")

if OP_KIND == "triton_op":
    from torch.library import wrap_triton

    window_attention_fwd = torch.library.triton_op(FORWARD_OP, mutates_args=())(_traceable_forward)
    window_attention_bwd = torch.library.triton_op(BACKWARD_OP, mutates_args=())(_traceable_backward)
else:
    window_attention_fwd = torch.library.custom_op(FORWARD_OP, mutates_args=())(launch.forward)
    window_attention_bwd = torch.library.custom_op(BACKWARD_OP, mutates_args=())(launch.backward)
    register_fakes(FORWARD_OP, BACKWARD_OP)
