"""Counting the attention's multiply-adds with fvcore, as for any other layer.

    from fvcore.nn import FlopCountAnalysis
    count = FlopCountAnalysis(model, images).set_op_handle(**rsir_kernels.flops.fvcore_handles())
    count.total()   # multiply-adds (fvcore's "flops"), the window attention included

fvcore traces with torch.jit.trace and can't see inside the attention op. Each query row
attends to the N keys of its window: q k^T and P v are 2 * N * D multiply-adds per row and
head (a partial last window counted as full; the softmax not counted, as fvcore counts no
elementwise op). torch.utils.flop_counter needs nothing: every op has a registered formula.
"""
from __future__ import annotations

from .graph_ops import FORWARD_OPS


def attention_macs(batch: int, length: int, heads: int, dim: int, window_size: int) -> int:
    return 2 * batch * length * heads * min(window_size, length) * dim


def _forward_handle(inputs, outputs):  # (q, k, v, index, window_size, scale)
    batch, length, heads, dim = inputs[0].type().sizes()
    return attention_macs(batch, length, heads, dim, inputs[4].toIValue())


def fvcore_handles() -> dict:
    """{op name: handle} for fvcore's FlopCountAnalysis.set_op_handle(**...)."""
    return {name: _forward_handle for name in FORWARD_OPS}
