"""ONNX export: the window attention op and IR-Win's stable argsort in standard ONNX operators.

    import rsir_kernels.onnx
    torch.onnx.export(model, (images,), "model.onnx", dynamo=True,
                      custom_translation_table=rsir_kernels.onnx.translation_table(),
                      dynamic_shapes=({0: torch.export.Dim("batch")},))

The attention becomes gather by index, MatMul, Softmax, MatMul, scatter back (onnxruntime runs
it on any provider; no custom ONNX op). The token count L is static (one graph per resolution);
the batch may be dynamic. fp16 / bf16 inputs are computed in float32, as the kernels do.
`aten.sort.stable` (argsort) becomes TopK, whose ties go to the lower index: a stable sort.
Needs onnxscript (pip install onnx onnxscript; onnxruntime to run the result).
"""
from __future__ import annotations

import inspect
import math

import torch
from onnxscript import opset18 as op

from .graph_ops import FORWARD_OPS, overload, registered

_FLOAT32 = 1  # onnx.TensorProto.FLOAT


def translation_table() -> dict:
    """{torch op: ONNX translation} for torch.onnx.export(..., custom_translation_table=...)."""
    table = {torch.ops.aten.sort.stable: stable_sort}
    for name in filter(registered, FORWARD_OPS):
        target = overload(name)
        table[target] = window_attention if len(target._schema.returns) == 2 else _out_only(window_attention)
    return table


def _out_only(translation):
    """The translation of an op that returns out alone (no lse)."""
    def out_only(*args, **kwargs):
        return translation(*args, **kwargs)[0]
    out_only.__signature__ = inspect.signature(translation)  # the exporter reads the attributes' types
    out_only.__annotations__ = translation.__annotations__
    return out_only


def window_attention(q, k, v, index, window_size: int, scale: float):
    """(B, L, H, D) q, k, v and a (B, G, L) index -> out (B, L, H, D), lse (B, H, L) float32."""
    return _attention(q, k, v, index, window_size, scale, q.shape[1:])


def _attention(q, k, v, index, window_size, scale, sizes):
    """sizes: (L, H, D) from the input's shape (an op's output here may carry none)."""
    length, heads, dim = (_static(size, name) for size, name in zip(sizes, ("L", "H", "D")))
    groups = _static(index.shape[1], "G")
    n = min(window_size, length)
    windows = math.ceil(length / n)
    pad = windows * n - length
    # (B, G, L) -> (B, H, L): head h uses its group's order
    order = op.Cast(index, to=7)  # int64
    order = op.Reshape(op.Expand(op.Unsqueeze(order, [2]), op.Constant(value_ints=[1, 1, heads // groups, 1])),
                       op.Constant(value_ints=[0, heads, length]))
    # the partial last window padded with token 0, whose extra key slots are masked below
    padded = op.Pad(order, op.Constant(value_ints=[0, 0, 0, 0, 0, pad])) if pad else order
    rows = op.Expand(op.Unsqueeze(padded, [3]), op.Constant(value_ints=[1, 1, 1, dim]))

    def windowed(t):  # (B, L, H, D) -> float32 (B, H, windows, n, D) in window order
        t = op.Transpose(op.Cast(t, to=_FLOAT32), perm=[0, 2, 1, 3])
        return op.Reshape(op.GatherElements(t, rows, axis=2), op.Constant(value_ints=[0, 0, windows, n, dim]))

    qw, kw, vw = windowed(q), windowed(k), windowed(v)
    scores = op.Mul(op.MatMul(qw, op.Transpose(kw, perm=[0, 1, 2, 4, 3])), op.Constant(value_float=scale))
    if pad:
        scores = op.Add(scores, op.Constant(value=_key_mask(windows, n, length)))
    probs = op.Softmax(scores, axis=-1)
    lse = op.ReduceLogSumExp(scores, op.Constant(value_ints=[-1]), keepdims=0)  # (B, H, windows, n)

    def restored(t, shape):  # window order (first L slots) -> token order, by scatter
        t = op.Reshape(t, op.Constant(value_ints=shape))
        if pad:
            t = op.Slice(t, op.Constant(value_ints=[0]), op.Constant(value_ints=[length]),
                         op.Constant(value_ints=[2]))
        where = order if len(shape) == 3 else op.Expand(op.Unsqueeze(order, [3]), op.Constant(value_ints=[1, 1, 1, dim]))
        return op.ScatterElements(op.Mul(t, op.Constant(value_float=0.0)), where, t, axis=2)

    out = restored(op.MatMul(probs, vw), [0, heads, windows * n, dim])
    out = op.CastLike(op.Transpose(out, perm=[0, 2, 1, 3]), q)
    return out, restored(lse, [0, heads, windows * n])


def _key_mask(windows, n, length):
    """(windows, n) additive mask over key slots: -inf on the padding slots of the last window."""
    import onnx

    slot = torch.arange(windows * n).view(windows, 1, n)
    mask = torch.zeros(windows, 1, n).masked_fill(slot >= length, -math.inf)
    return onnx.numpy_helper.from_array(mask.numpy(), name="key_mask")


def _static(dim, name):
    if not isinstance(dim, int):
        raise NotImplementedError(f"rsir_kernels.onnx: the window attention needs a static {name}, got {dim}; "
                                  "export one graph per resolution (only the batch may be dynamic)")
    return dim


def stable_sort(self, stable: bool = False, dim: int = -1, descending: bool = False):
    """aten.sort.stable as TopK over the whole axis; TopK puts equal values in index order."""
    k = op.Shape(self, start=dim, end=dim + 1 if dim != -1 else None)
    values, indices = op.TopK(self, k, axis=dim, largest=int(descending), sorted=1)
    return values, indices
