"""WindowAttention: the one autograd.Function between rsir_kernels.ops and a backend's ops.

    WindowAttention.apply(index, window_size, scale, chosen, *tensors) -> out
        tensors: (q, k, v), or (qkv,) packed (B, L, 3, H, D) whose gradient comes back as
        one packed tensor (the backward ops write dq, dk, dv packed: no stack, no copy).

forward runs the backend's forward op, setup_context saves the index and the input tensors
(nothing else: no backward reads out or lse), backward runs the backend's backward op, jvp
takes the tangent from the reference maths, and vmap folds the mapped dimension into the
batch. Two classes share these methods and count as the same route:
- CompiledWindowAttention, for torch.compile: Dynamo refuses a Function that defines jvp
  (torch._dynamo.variables.misc), so this subclass sets jvp back to the base's;
- EagerWindowAttention, for plain eager calls: the same methods in torch's older
  forward(ctx, ...) style, because a setup_context-style apply binds the forward's signature
  with inspect on every call (docs/performance.md, "host time of the autograd shell").
Which class runs is decided in one place, rsir_kernels.ops._run; whether the backend's ops or
their Python implementations run inside, in one place too, `kernel` below (per forward and per
backward: a backward may run under a dispatch mode its forward did not see).
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD

from . import reference

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


def graph_building_backward() -> bool:
    """True inside a backward that builds a graph (create_graph=True, torch.func's grad,
    jacrev, hessian): the gradient must then itself be differentiable, which the backward
    ops are not, so it is taken from the reference maths in plain differentiable ops
    (exact second order, at the reference's cost). torch.compile has no double backward;
    there the backward op always runs."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def kernel(chosen, what: str, tensors):
    """The backend's "forward" or "backward" to run on `tensors`: its Python implementation
    in plain eager calls, else its registered op (the one place that decides)."""
    if plain_eager(*tensors):
        return chosen.forward_impl if what == "forward" else chosen.backward_impl
    return chosen.forward if what == "forward" else chosen.backward


def profiled(chosen, what: str):
    """A named range for torch.profiler (which, on the eager path, sees no op of ours), only
    while a profiler runs (record_function costs microseconds a call), and never in a graph
    being compiled (there the ops themselves are the graph's named nodes)."""
    if not torch.compiler.is_compiling() and torch.autograd._profiler_enabled():
        return torch.autograd.profiler.record_function(f"rsir::window_attention_{what} ({chosen.name})")
    return contextlib.nullcontext()


def unpack(tensors):
    """(q, k, v) from (q, k, v) or from a packed (qkv,): views, no copy."""
    return tensors[0].unbind(2) if len(tensors) == 1 else tensors


class WindowAttention(torch.autograd.Function):
    """The backend's ops under autograd (module docstring)."""

    @staticmethod
    def forward(index, window_size, scale, chosen, *tensors):
        with profiled(chosen, "forward"):
            out, _lse = kernel(chosen, "forward", tensors)(*unpack(tensors), index, window_size, scale)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        index, window_size, scale, chosen, *tensors = inputs
        ctx.save_for_backward(index, *tensors)
        ctx.save_for_forward(index, *tensors)
        ctx.window_size, ctx.scale, ctx.chosen, ctx.packed = window_size, scale, chosen, len(tensors) == 1

    @staticmethod
    def backward(ctx, dout):
        """(dq, dk, dv) or (dqkv,): the backend's backward op, or in a backward that builds a
        graph the reference maths in differentiable ops."""
        index, *tensors = ctx.saved_tensors
        q, k, v = unpack(tensors)
        if graph_building_backward():
            dqkv = reference.window_attention_backward(dout, q, k, v, index, ctx.window_size, ctx.scale)
        else:
            with profiled(ctx.chosen, "backward"):
                dqkv = kernel(ctx.chosen, "backward", (dout, *tensors))(dout, q, k, v, index, ctx.window_size,
                                                                        ctx.scale)
        return (None, None, None, None, *((dqkv,) if ctx.packed else dqkv.unbind(2)))

    @staticmethod
    def jvp(ctx, _index_t, _window_size_t, _scale_t, _chosen_t, *tangents):
        """The tangent of out from the reference maths; tangents: of (q, k, v) or of (qkv,)."""
        index, *tensors = ctx.saved_tensors
        if ctx.packed:
            tangents = (None,) * 3 if tangents[0] is None else tangents[0].unbind(2)
        return reference.window_attention_jvp(*unpack(tensors), *tangents, index, ctx.window_size, ctx.scale)

    @staticmethod
    def vmap(info, in_dims, index, window_size, scale, chosen, *tensors):
        size = info.batch_size

        def fold(t, dim):  # the mapped dimension (or a broadcast one) into the batch
            t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.reshape(size * t.shape[1], *t.shape[2:])

        folded = [fold(t, d) for t, d in zip(tensors, in_dims[4:])]
        out = WindowAttention.apply(fold(index, in_dims[0]).contiguous(), window_size, scale, chosen, *folded)
        return out.reshape(size, -1, *out.shape[1:]), 0


class CompiledWindowAttention(WindowAttention):
    """WindowAttention under torch.compile: Dynamo traces its forward and backward (the
    backend's ops land in the graphs) but refuses a Function that defines jvp; compiled
    code has no forward mode."""

    jvp = torch.autograd.Function.jvp


class EagerWindowAttention(torch.autograd.Function):
    """WindowAttention's methods in the older forward(ctx, ...) style, for plain eager calls
    (reverse and forward mode; torch.func transforms need WindowAttention itself)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = WindowAttention.forward(*inputs)
        WindowAttention.setup_context(ctx, inputs, out)
        return out

    backward = staticmethod(WindowAttention.backward)
    jvp = staticmethod(WindowAttention.jvp)
