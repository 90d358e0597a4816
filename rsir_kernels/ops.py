"""The public window_attention: validation (once, for every backend), backend choice, glue.

Every backend registers a forward op and a backward op (rsir_kernels.backends); this module
checks the inputs, picks one backend and calls its forward op, whose autograd runs the same
backend's backward op. `window_attention_qkvpacked` is the same computation for a packed
(B, L, 3, H, D) qkv, whose gradient comes back packed with no copy.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import torch.utils.flop_counter

from . import backends

try:  # the innermost TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...), or None
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
except ImportError:  # a torch that moved it: always take the op path
    def _current_dispatch_mode():
        return True

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
        window_size: N >= 1 tokens per window: window w of group g is the tokens
            index[b, g, w*N:(w+1)*N]; when L % N != 0 the last window is partial.
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (the fastest that runs these inputs), or one of
            available_backends().
        check_index: verify that every row of index is a permutation (one host sync;
            skipped while torch.compile traces or a CUDA graph captures). Kernels mask
            their loads and stores, so a bad index unchecked gives wrong numbers, never an
            out-of-bounds access.
    Returns:
        out: (B, L, H, D) in q's dtype, in the original token order:
        out[b, t, h] is token t's attention output inside its own window.
    """
    _validate(q, k, v, index, window_size, scale, backend)
    if q.numel() == 0:
        return q * 0 + k * 0 + v * 0  # empty, but connected to the graph
    chosen, index, scale = _prepare(q, index, window_size, scale, backend, check_index)
    if _plain_eager(q, k, v, index):
        return _eager(chosen, index, window_size, scale, (q, k, v))
    return chosen.forward(q, k, v, index, window_size, scale)[0]


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
    _validate(q, k, v, index, window_size, scale, backend)
    if q.numel() == 0:
        return q * 0 + k * 0 + v * 0
    chosen, index, scale = _prepare(q, index, window_size, scale, backend, check_index)
    if _plain_eager(qkv, index):
        return _eager(chosen, index, window_size, scale, (qkv,))
    return _qkvpacked(qkv, index, window_size, scale, chosen.name)[0]


def _prepare(q, index, window_size, scale, backend, check_index):
    """Validated inputs -> (the backend to run, index made contiguous, the scale as a float)."""
    # the check's host sync can't run while torch.compile traces or a CUDA graph captures
    if (check_index and not torch.compiler.is_compiling()
            and not (index.is_cuda and torch.cuda.is_current_stream_capturing())):
        _check_index(index)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # (B, G, L) integers: a copy only for an expanded or sliced index, and backends may then
    # assume a contiguous one
    return choose_backend(backend, q, window_size), index.contiguous(), scale


@torch.library.custom_op("rsir::window_attention_qkvpacked", mutates_args=())
def _qkvpacked(qkv: torch.Tensor, index: torch.Tensor, window_size: int, scale: float,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return backends.get(backend).forward(*qkv.unbind(2), index, window_size, scale)


@_qkvpacked.register_fake
def _(qkv, index, window_size, scale, backend):
    return backends.reference.fake_forward(qkv[:, :, 0])


def _qkvpacked_setup(ctx, inputs, output):
    qkv, index, window_size, scale, backend = inputs
    ctx.save_for_backward(qkv, output[0], output[1], index)
    ctx.window_size, ctx.scale, ctx.backend = window_size, scale, backend


def _qkvpacked_backward(ctx, dout, _dlse):
    qkv, out, lse, index = ctx.saved_tensors
    dqkv = backends.get(ctx.backend).backward(dout, *qkv.unbind(2), out, lse, index, ctx.window_size, ctx.scale)
    return dqkv, None, None, None, None


torch.library.register_autograd("rsir::window_attention_qkvpacked", _qkvpacked_backward,
                                setup_context=_qkvpacked_setup)


def _qkvpacked_flops(qkv_shape, index_shape, window_size, scale, backend, out_shape=None, **kwargs):
    # the FLOP counter does not see the backend op this op runs inside
    batch, length, _, heads, dim = qkv_shape
    return backends.forward_flops((batch, length, heads, dim), window_size)


torch.utils.flop_counter.register_flop_formula(torch.ops.rsir.window_attention_qkvpacked)(_qkvpacked_flops)


# ---------------------------------------------------------------- the eager path

def _plain_eager(*tensors: torch.Tensor) -> bool:
    """True when nothing needs the ops: no torch.compile or torch.jit tracing, no dispatch
    mode (fake tensors, FLOP counting, ...), plain tensors (no subclass, no functorch
    transform). Then the backend's implementation runs under the torch.autograd.Function
    below, skipping the custom ops' dispatch and autograd glue in Python: on a GPU that host
    time, not the kernels, bounds the small stages (benchmarks/NOTES.md, "Measured on an
    H200")."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor and not _functorch_wrapped(t) for t in tensors)


_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


def _profiled(chosen, what: str):
    """A named range for torch.profiler (which, on the eager path, sees no op of ours), only
    while a profiler runs: record_function costs microseconds a call."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(f"rsir::window_attention_{what} ({chosen.name})")
    return contextlib.nullcontext()


def _eager(chosen, index, window_size, scale, tensors):
    """The eager path of both entry points; tensors is (q, k, v) or a packed (qkv,)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _EagerAttention.apply(index, window_size, scale, chosen, *tensors)
    with _profiled(chosen, "forward"):
        return chosen.forward_impl(*_unpack(tensors), index, window_size, scale)[0]


def _unpack(tensors):
    return tensors[0].unbind(2) if len(tensors) == 1 else tensors


class _EagerAttention(torch.autograd.Function):
    """chosen.forward_impl / backward_impl under autograd, with the same saved tensors as the
    op path. tensors: (q, k, v), or (qkv,) whose packed gradient then comes back as is."""

    @staticmethod
    def forward(ctx, index, window_size, scale, chosen, *tensors):
        with _profiled(chosen, "forward"):
            out, lse = chosen.forward_impl(*_unpack(tensors), index, window_size, scale)
        ctx.save_for_backward(out, lse, index, *tensors)
        ctx.window_size, ctx.scale, ctx.chosen = window_size, scale, chosen
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        out, lse, index, *tensors = ctx.saved_tensors
        with _profiled(ctx.chosen, "backward"):
            dqkv = ctx.chosen.backward_impl(dout, *_unpack(tensors), out, lse, index, ctx.window_size, ctx.scale)
        grads = (dqkv,) if len(tensors) == 1 else dqkv.unbind(2)
        return (None, None, None, None, *grads)


# ---------------------------------------------------------------- backend choice

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def choose_backend(name: str, q: torch.Tensor, window_size: int) -> backends.Backend:
    """The backend that runs q's device, dtype, head dim and window size.

    An explicit name that can't run them raises; "auto" takes the highest-priority one for
    q's device that can, warning once when a faster one had to be passed over.
    """
    if name != "auto":
        chosen = backends.get(name)
        if chosen.unavailable is not None:
            raise RuntimeError(f"backend {name!r} is not available in this install: {chosen.unavailable}")
        reason = chosen.cannot_run(q, window_size)
        if reason is not None:
            raise ValueError(f"backend {name!r} cannot run these inputs: {reason}")
        return chosen
    device = q.device.type
    ranked = sorted((b for b in map(backends.get, backends.names()) if device in b.priority),
                    key=lambda b: -b.priority[device])
    passed_over = []
    for candidate in ranked:
        reason = candidate.unavailable or candidate.cannot_run(q, window_size)
        if reason is None:
            if passed_over and not torch.compiler.is_compiling():
                _warn_once(f"rsir_kernels: backend 'auto' uses {candidate.name!r} on {device}; "
                           + "; ".join(passed_over))
            return candidate
        passed_over.append(f"{candidate.name!r} skipped: {reason}")
    return backends.get("reference")  # every device, every dtype


# ---------------------------------------------------------------- validation

def _validate(q, k, v, index, window_size, scale, backend) -> None:
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
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    if backend != "auto" and backend not in backends.names():
        raise ValueError(f"backend must be 'auto' or one of {backends.names()}, got {backend!r}")


def _check_index(index: torch.Tensor) -> None:
    """Raises ValueError naming the first (batch, group) whose row is not a permutation."""
    length = index.shape[-1]
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
