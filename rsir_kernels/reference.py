"""Pure-PyTorch reference of the window-attention primitive (docs/design.md section 1).

Gather the window's rows, attend on windows, scatter back: vectorised over batch, heads
and windows, differentiable by autograd through plain ops. Tests and benchmarks import
this module; they never copy it. `window_attention_backward` is the analytic
(FlashAttention-style) gradient that the `reference` backend's backward op runs; tests
check it against autograd through `window_attention_reference`.
"""
from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype, upcast: bool = True) -> torch.dtype:
    """The dtype the math runs in: fp16/bf16 are upcast to fp32 unless asked not to."""
    return torch.float32 if (upcast and dtype in _LOW_PRECISION) else dtype


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_index(index: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, G, L) token order per group -> (B, H, L) int64 order per head."""
    batch, groups, length = index.shape
    per_group = num_heads // groups
    return index.long()[:, :, None, :].expand(batch, groups, per_group, length).reshape(batch, num_heads, length)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, L, H, D) any strides, idx (B, H, L) -> (B, H, L, D) in window order."""
    return torch.gather(x.transpose(1, 2), 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def scatter_tokens(xs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Inverse of gather_tokens: xs (B, H, L, D) in window order -> (B, L, H, D)."""
    out = torch.zeros_like(xs).scatter(2, idx[..., None].expand_as(xs), xs)
    return out.transpose(1, 2)


def split_windows(xs: torch.Tensor, window_size: int) -> list[torch.Tensor]:
    """(B, H, L, ...) in window order -> views (B, H, nW, N, ...) of the full windows,
    then (B, H, 1, r, ...) for a partial last window when L % N != 0."""
    length = xs.shape[2]
    full = length - length % window_size
    parts = []
    if full:
        # reshape, not unflatten (nor flatten in merge_windows): functorch has no batching rule
        # for them where a backward or jvp runs on vmapped tensors (batched gradients)
        parts.append(xs[:, :, :full].reshape(*xs.shape[:2], full // window_size, window_size, *xs.shape[3:]))
    if full < length:
        parts.append(xs[:, :, full:].unsqueeze(2))
    return parts


def merge_windows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of split_windows."""
    return torch.cat([p.reshape(*p.shape[:2], -1, *p.shape[4:]) for p in parts], dim=2)


def attend(q, k, v, scale):
    """softmax(q k^T * scale) v on windows (..., n, D); also returns the row log-sum-exp."""
    scores = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(scores, dim=-1) @ v, torch.logsumexp(scores, dim=-1)


def softmax_grad(p, dp):
    """P * (dP - delta), delta = rowsum(P * dP) / rowsum(P): the softmax's derivative along
    its rows (..., n), for the gradient of the scores (dP = dO V^T) and the tangent of P
    (dP = the scores' tangent) alike.

    delta in two passes: the second takes delta again from the residual dP - delta1. Where
    the softmax saturates, dP_i - delta at the row's top score is a difference of two nearly
    equal numbers, and one rounding of a single-pass delta (an ulp of |dP|) is then its
    whole error: reference::279 (two tokens, scores ~1e2) lost 3x the fp32 autograd
    reference's dq accuracy that way; the residual's delta is small and rounds finely.
    Dividing by rowsum(P) (1 up to rounding) makes a large common part of dP (v with a large
    mean) cancel exactly instead of leaving (rowsum - 1) * dP.
    """
    total = p.sum(-1, keepdim=True)
    residual = dp - (p * dp).sum(-1, keepdim=True) / total
    return p * (residual - (p * residual).sum(-1, keepdim=True) / total)


def window_attention_with_lse(q, k, v, index, window_size, scale=None, *, upcast=True):
    """The primitive: (out (B, L, H, D), lse (B, H, L)). See window_attention_reference."""
    batch, length, heads, dim = q.shape
    scale = dim ** -0.5 if scale is None else scale
    work = compute_dtype(q.dtype, upcast)
    idx = head_index(index, heads)
    qs, ks, vs = (gather_tokens(t.to(work), idx) for t in (q, k, v))
    results = [attend(*w, scale) for w in zip(*(split_windows(t, window_size) for t in (qs, ks, vs)))]
    out = merge_windows([o for o, _ in results])
    lse = merge_windows([s[..., None] for _, s in results])[..., 0]
    out = scatter_tokens(out, idx).to(q.dtype)
    lse = torch.zeros_like(lse).scatter(2, idx, lse).to(lse_dtype(q.dtype))
    return out, lse


def window_attention_reference(q, k, v, index, window_size, scale=None, *, upcast=True):
    """Reference window attention, differentiable through plain PyTorch ops.

    Args:
        q, k, v: (B, L, H, D), any strides.
        index: (B, G, L) int32/int64; row (b, g) is the token order of head group g
            (heads g*H/G .. (g+1)*H/G - 1); window w is index[b, g, w*N:(w+1)*N].
        window_size: N, tokens per window; a partial last window attends within itself.
        scale: softmax scale, default D ** -0.5.
        upcast: compute fp16/bf16 inputs in fp32 (the default); False keeps the input
            precision, the same-precision reference of docs/design.md section 4.
    Returns:
        (B, L, H, D) in q's dtype, in the original token order.
    """
    return window_attention_with_lse(q, k, v, index, window_size, scale, upcast=upcast)[0]


def window_attention_backward(dout, q, k, v, index, window_size, scale):
    """Analytic gradient: returns dqkv (B, L, 3, H, D).

    Recomputes P = softmax(q k^T * scale) per window, the forward's own ops, so that the
    backward's P is the forward's P; dP = dO V^T; dS = P * (dP - delta) (softmax_grad);
    dV = P^T dO, dQ = dS K * scale, dK = dS^T Q * scale.
    P is not rebuilt as exp(q k^T * scale - lse) from the saved lse: one rounding step of an
    fp32 lse of magnitude m is a relative error of ~m * 2^-24 in every P of the row, which
    at scores ~1e3 is 100x the fp32 forward's own error (fuzz case reference::505).
    delta from P and dP in the compute dtype rather than FlashAttention's rowsum(dO * O): O
    is rounded to q's dtype, and at a saturated softmax that rounding alone costs fp16/bf16
    dq its accuracy (docs/design.md section 9). So no output of the forward is read.

    Built from plain ops, it is differentiable in dout, q, k and v (the softmax is recomputed
    from q and k with its graph): a backward that builds a graph runs it for exact second
    order (rsir_kernels.autograd_functions).
    """
    heads = q.shape[2]
    work = compute_dtype(q.dtype)
    idx = head_index(index, heads)
    qs, ks, vs, dos = (gather_tokens(t.to(work), idx) for t in (q, k, v, dout))
    grads = []
    for qw, kw, vw, dow in zip(*(split_windows(t, window_size) for t in (qs, ks, vs, dos))):
        p = torch.softmax((qw @ kw.transpose(-1, -2)) * scale, dim=-1)
        ds = softmax_grad(p, dow @ vw.transpose(-1, -2))
        grads.append((ds @ kw * scale, ds.transpose(-1, -2) @ qw * scale, p.transpose(-1, -2) @ dow))
    dq, dk, dv = (scatter_tokens(merge_windows(list(g)), idx) for g in zip(*grads))
    return torch.stack((dq, dk, dv), dim=2).to(q.dtype)


def window_attention_jvp(q, k, v, tq, tk, tv, index, window_size, scale):
    """Forward-mode derivative: the tangent of out (B, L, H, D) for tangents tq, tk, tv
    (each (B, L, H, D) or None for zero), in q's dtype, computed in compute_dtype.

    Per window, with S = q k^T * scale, P = softmax(S), out = P V:
    dS = (tq k^T + q tk^T) * scale, dP = P * (dS - rowsum(P * dS)) (softmax_grad),
    tout = dP V + P tv.
    """
    heads = q.shape[2]
    work = compute_dtype(q.dtype)
    idx = head_index(index, heads)
    tq, tk, tv = (torch.zeros_like(q) if t is None else t for t in (tq, tk, tv))
    gathered = (gather_tokens(t.to(work), idx) for t in (q, k, v, tq, tk, tv))
    parts = []
    for qw, kw, vw, tqw, tkw, tvw in zip(*(split_windows(t, window_size) for t in gathered)):
        p = torch.softmax((qw @ kw.transpose(-1, -2)) * scale, dim=-1)
        ds = (tqw @ kw.transpose(-1, -2) + qw @ tkw.transpose(-1, -2)) * scale
        dp = softmax_grad(p, ds)
        parts.append(dp @ vw + p @ tvw)
    return scatter_tokens(merge_windows(parts), idx).to(q.dtype)


# ---------------------------------------------------------------- the tolerance rule
#
# The one rule by which the tests (tests/util.py), the fuzz (scripts/fuzz.py) and the
# benchmarks' checks (benchmarks/common/measure.py) accept a result against the float64
# reference (docs/design.md section 4).

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
LOW_PRECISION_ATOL = 1e-3


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e| (absolute where e is all zero, e.g. dq of one-token windows);
    NaN anywhere in actual counts as infinite error."""
    a, e = actual.detach().double(), expected.detach().double()
    if torch.isnan(a).any():
        return float("inf")
    if not a.numel():
        return 0.0
    scale = float(e.abs().max())
    return float((a - e).abs().max()) / (scale if scale > 1e-12 else 1.0)


def tolerance_failure(actual: torch.Tensor, exact: torch.Tensor, low_precision: torch.Tensor = None,
                      level: float = 0.0):
    """None if `actual` is within the rule of the float64 `exact`, else why not.

    fp32, fp64: max_rel_error(actual, exact) <= max(RTOL[dtype], 2 * level), where `level` is
        the error of equally valid evaluations of the reference in that precision (0 unless a
        caller measures it: the fuzz does, scripts/fuzz.py error_level, because at large
        magnitudes the fp32 reference itself is further than 1e-5 off).
    fp16, bf16: max |actual - exact| <= 2 * max |low_precision - exact| + LOW_PRECISION_ATOL,
        low_precision being the reference computed in that precision: FlashAttention's
        factor 2, plus an absolute term of this project's.
    A shape mismatch or a NaN fails.
    """
    if tuple(actual.shape) != tuple(exact.shape):
        return f"shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    if torch.isnan(actual).any():
        return "NaN"
    if actual.dtype in _LOW_PRECISION:
        if low_precision is None:
            raise ValueError("fp16/bf16 needs the same-precision reference")
        err, ref_err = (float((x.detach().double() - exact).abs().max()) if x.numel() else 0.0
                        for x in (actual, low_precision))
        bound = 2 * ref_err + LOW_PRECISION_ATOL
        return None if err <= bound else f"error {err:.3g} > 2 x {ref_err:.3g} + {LOW_PRECISION_ATOL}"
    err, bound = max_rel_error(actual, exact), max(RTOL[actual.dtype], 2 * level)
    return None if err <= bound else f"relative error {err:.3g} > {bound:.3g}"
