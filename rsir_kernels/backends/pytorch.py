"""The `reference` backend: its forward and backward ops in pure PyTorch.

Runs on every device and dtype; the slowest path (it materialises the gathered windows and
the attention matrix), kept as the backend of last resort and the op-level twin of the
fused kernels. The maths is rsir_kernels.reference; this module only registers it as ops.
"""
from __future__ import annotations

import torch

from .. import reference
from .registry import Backend, register, register_fakes

NAME = "reference"
FORWARD_OP = "rsir::window_attention"
BACKWARD_OP = "rsir::window_attention_backward"


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = reference.window_attention_with_lse(q, k, v, index, window_size, scale)
    return out.contiguous(), lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
             window_size: int, scale: float) -> torch.Tensor:
    return reference.window_attention_backward(dout, q, k, v, index, window_size, scale)


window_attention_fwd = torch.library.custom_op(FORWARD_OP, mutates_args=())(forward)
window_attention_bwd = torch.library.custom_op(BACKWARD_OP, mutates_args=())(backward)
register_fakes(FORWARD_OP, BACKWARD_OP)


register(Backend(
    name=NAME,
    forward_op=FORWARD_OP,
    backward_op=BACKWARD_OP,
    priority={"cpu": 0, "cuda": 0},
    eager_forward=forward,
    eager_backward=backward,
))
