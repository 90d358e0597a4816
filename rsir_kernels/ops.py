"""The public window_attention: validation (once, for every backend) and the index check.

This module checks the inputs and hands them to rsir_kernels.routing, which chooses the
backend and the route (autograd.Function, registered ops or their Python implementations)
and runs it. `window_attention_qkvpacked` is the same computation for a packed
(B, L, 3, H, D) qkv, whose gradient comes back packed with no copy.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import backends, reference, routing

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is missing; "" when available


def available_backends() -> dict[str, BackendStatus]:
    """Backend name -> (available, why not) for this install."""
    return {name: BackendStatus(b.unavailable is None, b.unavailable or "")
            for name, b in ((n, backends.get(n)) for n in backends.names())}


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                     window_size: int, *, scale: Optional[float] = None, backend: str = "auto",
                     check_index: bool = True) -> torch.Tensor:
    """Attention inside windows of tokens taken in the order `index` gives (RS-Win, IR-Win).

    Args:
        q, k, v: (B, L, H, D), one dtype (fp16, bf16, fp32, fp64) and device, any strides
            (views of a packed qkv are read in place).
        index: (B, G, L) int32 or int64 on q's device, G dividing H; row (b, g) is a
            permutation of 0..L-1, the token order of heads g*H/G .. (g+1)*H/G - 1.
        window_size: N >= 1 tokens per window (any Python int; N >= L is one window of
            all L tokens): window w of group g is the tokens index[b, g, w*N:(w+1)*N];
            when L % N != 0 the last window is partial.
        scale: softmax scale, default D ** -0.5; |scale| at most half the largest finite
            value of the precision the inputs are computed in (float32 for fp16/bf16/fp32:
            1.7e38; float64 for fp64: 9e307), else a ValueError. Scores that overflow that
            precision give NaN, as torch.softmax does.
        backend: "auto" (the fastest that runs these inputs), or one of
            available_backends().
        check_index: verify that every row of index is a permutation (one host sync;
            skipped where the values can't be read: while torch.compile or torch.jit
            traces, a CUDA graph captures, on fake or meta tensors, under FakeTensorMode
            or make_fx, and on an index mapped by torch.func.vmap).
            Unchecked, a row that is not a permutation never makes a kernel touch memory
            outside its tensors, and gives, for the heads of its group:
            - a token no window visits: out = 0 and dq = dk = dv = 0 (every backend);
            - an entry outside 0..L-1: an absent slot of its window, neither read as a key
              nor written (cpp, triton); the reference backend raises torch.gather's
              RuntimeError "index ... is out of bounds" (a device-side assert on CUDA);
            - a token visited more than once: its out row and gradient rows are those of
              one of its windows, which one unspecified (every backend); the gradients of
              the other tokens of those windows are unspecified too.
    Returns:
        out: (B, L, H, D) in q's dtype, in the original token order:
        out[b, t, h] is token t's attention output inside its own window.

    Derivatives: every autograd route is exact. Reverse mode runs the backend's backward;
    a backward that builds a graph (create_graph=True, torch.func.grad / jacrev /
    hessian) takes the gradient from the reference maths in differentiable ops, so second
    order is exact at the reference's cost. Forward mode (torch.func.jvp, jacfwd,
    torch.autograd.forward_ad) takes the tangent from the reference maths;
    torch.func.vmap folds the mapped dimension into the batch. Under torch.compile: reverse
    mode, no forward mode. torch.jit.trace records the backend's forward op alone (what FLOP
    counters that trace read); a traced graph has no derivative (its backward raises).
    """
    window_size = _validate(q, k, v, index, window_size, scale, backend)
    if q.numel() == 0:
        return q * 0 + k * 0 + v * 0  # empty, but connected to the graph
    index, scale = _prepare(q, index, scale, check_index)
    return routing.run(backend, q, index, window_size, scale, (q, k, v))


def window_attention_qkvpacked(qkv: torch.Tensor, index: torch.Tensor, window_size: int, *,
                               scale: Optional[float] = None, backend: str = "auto",
                               check_index: bool = True) -> torch.Tensor:
    """window_attention on a packed qkv (B, L, 3, H, D) -> (B, L, H, D).

    Same as window_attention(*qkv.unbind(2), ...), but the backward writes one packed
    (B, L, 3, H, D) gradient instead of three that autograd would stack into one.
    """
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape (B, L, 3, H, D), got {tuple(qkv.shape)}")
    q, k, v = qkv.unbind(2)
    window_size = _validate(q, k, v, index, window_size, scale, backend)
    if q.numel() == 0:
        return q * 0 + k * 0 + v * 0
    index, scale = _prepare(q, index, scale, check_index)
    return routing.run(backend, q, index, window_size, scale, (qkv,))


def _prepare(q, index, scale, check_index):
    """Validated inputs -> (index made contiguous and, if asked and readable, checked; the
    scale as a float)."""
    # (B, G, L) integers: a copy only for an expanded or sliced index, and backends (and the
    # check) may then assume a contiguous one
    index = index.contiguous()
    if check_index and routing.index_readable(index):
        _check_index(index)
    return index, q.shape[-1] ** -0.5 if scale is None else float(scale)


# ---------------------------------------------------------------- validation

def _validate(q, k, v, index, window_size, scale, backend) -> int:
    """Raises a named TypeError / ValueError for a bad argument; returns the window size to
    run, min(window_size, L)."""
    for name, t in (("q", q), ("k", k), ("v", v), ("index", index)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be 4-D (B, L, H, D), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q must be one of {', '.join(map(str, _DTYPES))}, got {q.dtype}")
    batch, length, heads, _ = q.shape
    if index.dim() != 3 or index.shape[0] != batch or index.shape[2] != length:
        raise ValueError(f"index must have shape (B, G, L) = ({batch}, G, {length}), got {tuple(index.shape)}")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index must be torch.int32 or torch.int64, got {index.dtype}")
    if index.device != q.device:
        raise ValueError(f"index must be on q's device {q.device}, got {index.device}")
    groups = index.shape[1]
    if groups < 1 or heads % groups:
        raise ValueError(f"index's group count G={groups} must divide the head count H={heads}")
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"window_size must be an int, got {type(window_size).__name__}")
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        _check_scale(scale, q.dtype)
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"backend must be 'auto' or one of {backends.names()}, got {backend!r}")
    # N >= L is one window of all L tokens: the same result, and a size every op can hold
    return max(1, min(window_size, length))


def _check_scale(scale, dtype: torch.dtype) -> None:
    """scale must be finite in the compute precision, with room for the factor log2(e) ~ 1.44
    that kernels fold into it (exp2 softmax): a larger one rounds to inf there and every
    score becomes inf or NaN."""
    work = reference.compute_dtype(dtype)
    limit = torch.finfo(work).max / 2
    try:
        value = float(scale)
    except OverflowError:  # an int beyond float64
        value = math.inf
    if not (math.isfinite(value) and abs(value) <= limit):
        shown = f"{value:.4g}" if math.isfinite(value) or isinstance(scale, float) else "an int beyond float64"
        raise ValueError(f"scale must be finite in {work}, the compute precision of {dtype} inputs "
                         f"(|scale| <= {limit:.4g}), got {shown}")


def _native_index_check():
    """torch.ops.rsir_ext.first_bad_index_row (csrc/torch/index_check.cpp) where the ops library
    is loaded and has it, else None."""
    global _native_check
    if _native_check is None:  # the cpp backend's import loads the library; this only asks
        try:
            torch._C._get_schema("rsir_ext::first_bad_index_row", "")
            _native_check = torch.ops.rsir_ext.first_bad_index_row
        except RuntimeError:  # not registered: no ops library, or one built before the op
            _native_check = False
    return _native_check or None


_native_check = None


def _check_index(index: torch.Tensor) -> None:
    """Raises ValueError naming the first (batch, group) whose row is not a permutation."""
    length = index.shape[-1]
    native = _native_index_check() if index.device.type == "cpu" else None
    if native is not None:  # one pass per row in C++: a tenth of the tensor ops' time below
        first = native(index)
        if first < 0:
            return
        b, g = divmod(first, index.shape[1])
    else:
        # L values, all in 0..L-1, that together cover 0..L-1: a permutation (O(L), unlike a sort)
        in_range = ((index >= 0) & (index < length)).all(dim=-1)
        seen = torch.zeros(index.shape, dtype=torch.bool, device=index.device)
        seen.scatter_(2, index.clamp(0, length - 1).long(), True)
        bad = ~(in_range & seen.all(dim=-1))  # (B, G), on index's device
        if not bool(bad.any()):  # the one host sync
            return
        b, g = (int(i) for i in bad.nonzero()[0])
    row = index[b, g]
    lo, hi = int(row.min()), int(row.max())
    if lo < 0 or hi >= length:
        detail = f"it holds {lo if lo < 0 else hi}, outside 0..{length - 1}"
    else:
        counts = torch.bincount(row.long(), minlength=length)
        token = int((counts > 1).nonzero()[0])
        detail = f"token {token} appears {int(counts[token])} times"
    raise ValueError(f"index[{b}, {g}] is not a permutation of 0..{length - 1}: {detail}")
