"""The autograd.Functions that run a backend outside torch.compile and torch.jit.trace.

Plain eager calls run the backend's implementation directly, dispatch modes (fake tensors,
FLOP counting), tensor subclasses and torch.func transforms its registered ops. Both
Functions give the same derivatives: reverse mode by the backend's backward op (inside a
backward that builds a graph, by the reference maths in differentiable ops: exact second
order), forward mode by the reference maths' tangent, and TransformedAttention a vmap rule.
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from . import backends, reference

try:  # the innermost TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...), or None
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
except ImportError:  # a torch that moved it: always take the op path
    def _current_dispatch_mode():
        return True


# a tensor inside a torch.func transform (grad, jvp, vmap wrap their inputs)
functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True when nothing needs the ops: no torch.compile or torch.jit tracing, no dispatch
    mode (fake tensors, FLOP counting, ...), plain tensors (no subclass, no functorch
    transform). Then the backend's implementation runs directly, skipping the custom ops'
    dispatch in Python: on a GPU that host time, not the kernels, bounds the small stages
    (docs/performance.md, "Lessons that hold")."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor and not functorch_wrapped(t) for t in tensors)


def needs_autograd(tensors) -> bool:
    """Whether a derivative may be taken: reverse mode (grad mode and an input requiring
    grad) or forward mode (a dual level open)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or fwAD._current_level >= 0


def forward_fn(chosen, tensors):
    """The backend's forward to run: its implementation in plain eager calls, else its op."""
    return chosen.forward_impl if plain_eager(*tensors) else chosen.forward


def backward_fn(chosen, tensors):
    return chosen.backward_impl if plain_eager(*tensors) else chosen.backward


def profiled(chosen, what: str):
    """A named range for torch.profiler (which, on the eager path, sees no op of ours), only
    while a profiler runs: record_function costs microseconds a call."""
    if torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(f"rsir::window_attention_{what} ({chosen.name})")
    return contextlib.nullcontext()


def unpack(tensors):
    return tensors[0].unbind(2) if len(tensors) == 1 else tensors


# Two autograd.Functions with the same derivatives. Plain tensors take EagerAttention, in
# the old style (forward(ctx, ...)): torch binds a setup_context-style forward's signature
# with inspect on every apply (measured on a 2-core CPU: forward and backward 0.41 -> 0.57 ms
# on a small input). torch.func transforms need the
# setup_context style (and take a vmap rule): TransformedAttention.

def _save(ctx, index, window_size, scale, chosen, tensors, out, lse):
    ctx.save_for_backward(out, lse, index, *tensors)
    ctx.save_for_forward(index, *tensors)
    ctx.window_size, ctx.scale, ctx.chosen, ctx.packed = window_size, scale, chosen, len(tensors) == 1


def _backward(ctx, dout):
    """(dq, dk, dv) or (dqkv,): the backend's backward, or in a backward that builds a graph
    the reference maths in differentiable ops."""
    out, lse, index, *tensors = ctx.saved_tensors
    q, k, v = unpack(tensors)
    if backends.differentiable_backward_needed():
        dqkv = reference.window_attention_vjp(dout, q, k, v, index, ctx.window_size, ctx.scale)
    else:
        with profiled(ctx.chosen, "backward"):
            run = backward_fn(ctx.chosen, (dout, *tensors))
            dqkv = run(dout, q, k, v, out, lse, index, ctx.window_size, ctx.scale)
    return (dqkv,) if ctx.packed else dqkv.unbind(2)


def _jvp(ctx, tangents):
    """The tangent of out from the reference maths; tangents: of (q, k, v) or of (qkv,)."""
    index, *tensors = ctx.saved_tensors
    if ctx.packed:
        tangents = (None,) * 3 if tangents[0] is None else tangents[0].unbind(2)
    return reference.window_attention_jvp(*unpack(tensors), *tangents, index, ctx.window_size, ctx.scale)


class EagerAttention(torch.autograd.Function):
    """The backend under autograd on plain tensors -> out. tensors: (q, k, v), or (qkv,)
    whose packed gradient then comes back as is. The backend's implementation runs directly
    in plain eager calls, its ops otherwise (dispatch modes, tensor subclasses)."""

    @staticmethod
    def forward(ctx, index, window_size, scale, chosen, *tensors):
        with profiled(chosen, "forward"):
            out, lse = forward_fn(chosen, tensors)(*unpack(tensors), index, window_size, scale)
        _save(ctx, index, window_size, scale, chosen, tensors, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        return (None, None, None, None, *_backward(ctx, dout))

    @staticmethod
    def jvp(ctx, _index_t, _window_size_t, _scale_t, _chosen_t, *tangents):
        return _jvp(ctx, tangents)


class TransformedAttention(torch.autograd.Function):
    """EagerAttention for tensors inside torch.func transforms -> (out, lse), lse without
    derivative; vmap folds the mapped dimension into the batch, one call."""

    @staticmethod
    def forward(index, window_size, scale, chosen, *tensors):
        return forward_fn(chosen, tensors)(*unpack(tensors), index, window_size, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        index, window_size, scale, chosen, *tensors = inputs
        ctx.mark_non_differentiable(output[1])
        _save(ctx, index, window_size, scale, chosen, tensors, *output)

    @staticmethod
    def backward(ctx, dout, _dlse):
        return (None, None, None, None, *_backward(ctx, dout))

    @staticmethod
    def jvp(ctx, _index_t, _window_size_t, _scale_t, _chosen_t, *tangents):
        return _jvp(ctx, tangents), None

    @staticmethod
    def vmap(info, in_dims, index, window_size, scale, chosen, *tensors):
        size = info.batch_size

        def fold(t, dim):  # the mapped dimension (or a broadcast one) into the batch
            t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.reshape(size * t.shape[1], *t.shape[2:])

        folded = [fold(t, d) for t, d in zip(tensors, in_dims[4:])]
        out, lse = TransformedAttention.apply(fold(index, in_dims[0]).contiguous(), window_size, scale, chosen,
                                               *folded)
        return (out.reshape(size, -1, *out.shape[1:]), lse.reshape(size, -1, *lse.shape[1:])), (0, 0)
