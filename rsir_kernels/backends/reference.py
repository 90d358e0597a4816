"""The `reference` backend: rsir::window_attention and its backward op, pure PyTorch.

Runs on every device and dtype; the slowest path (it materialises the gathered windows and
the attention matrix), kept as the backend of last resort and the op-level twin of the
fused kernels.
"""
from __future__ import annotations

import torch

from .. import reference
from . import Backend, register


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = reference.window_attention_with_lse(q, k, v, index, window_size, scale)
    return out.contiguous(), lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, index: torch.Tensor,
             window_size: int, scale: float) -> torch.Tensor:
    return reference.window_attention_backward(dout, q, k, v, out, lse, index, window_size, scale)


window_attention_fwd = torch.library.custom_op("rsir::window_attention", mutates_args=())(forward)
window_attention_bwd = torch.library.custom_op("rsir::window_attention_backward", mutates_args=())(backward)


@window_attention_fwd.register_fake
def _(q, k, v, index, window_size, scale):
    return fake_forward(q)


@window_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, index, window_size, scale):
    return fake_backward(q)


def fake_forward(q):
    """Output metadata of every backend's forward op: out (B, L, H, D), lse (B, H, L)."""
    batch, length, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=reference.lse_dtype(q.dtype))


def fake_backward(q):
    """Output metadata of every backend's backward op: dqkv (B, L, 3, H, D)."""
    batch, length, heads, dim = q.shape
    return q.new_empty((batch, length, 3, heads, dim))


register(Backend(
    name="reference",
    forward_op="rsir::window_attention",
    backward_op="rsir::window_attention_backward",
    priority={"cpu": 0, "cuda": 0},
    eager_forward=forward,
    eager_backward=backward,
))
