"""WindowAttention: the one autograd.Function between rsir_kernels.routing and a backend's kernels.

    WindowAttention.apply(index, window_size, scale, kernels, *tensors) -> out
        kernels: backends.Kernels, the forward and backward to run (rsir_kernels.routing);
        tensors: (q, k, v), or (qkv,) packed (B, L, 3, H, D) whose gradient comes back as
        one packed tensor (the backward ops write dq, dk, dv packed: no stack, no copy).

forward runs kernels.forward, setup_context saves the index and the input tensors (nothing
else: no backward reads out or lse), backward runs what rsir_kernels.routing.backward_kernel
names, jvp takes the tangent from the reference maths, and vmap folds the mapped dimension
into the batch. Two classes share these methods and count as the same Function:
- CompiledWindowAttention, for torch.compile: Dynamo refuses a Function that defines jvp
  (torch._dynamo.variables.misc), so this subclass sets jvp back to the base's;
- EagerWindowAttention, for plain eager calls: the same methods in torch's older
  forward(ctx, ...) style, because a setup_context-style apply binds the forward's signature
  with inspect on every call (docs/performance.md, "host time of the autograd shell").
Which class runs, and with which kernels, is rsir_kernels.routing's decision.
"""
from __future__ import annotations

import torch

from . import reference

# What a backward runs and the profiler's ranges are rsir_kernels.routing's decisions. routing
# imports this module (its route table names these classes) and hands itself over on import
# (`bind`), so the imports run one way: routing -> autograd_functions.
routing = None


def bind(router) -> None:
    """Called by rsir_kernels.routing on import: `router` answers `backward_kernel` and
    `profiled` for the Functions here."""
    global routing
    routing = router


def unpack(tensors):
    """(q, k, v) from (q, k, v) or from a packed (qkv,): views, no copy."""
    return tensors[0].unbind(2) if len(tensors) == 1 else tensors


class WindowAttention(torch.autograd.Function):
    """A backend's kernels under autograd (module docstring)."""

    @staticmethod
    def forward(index, window_size, scale, kernels, *tensors):
        """out (B, L, H, D); also the whole forward of the routes without a Function."""
        with routing.profiled(kernels.backend, "forward"):
            out, _lse = kernels.forward(*unpack(tensors), index, window_size, scale)
        return out

    @staticmethod
    def setup_context(ctx, inputs, output):
        index, window_size, scale, kernels, *tensors = inputs
        ctx.save_for_backward(index, *tensors)
        ctx.save_for_forward(index, *tensors)
        ctx.window_size, ctx.scale, ctx.kernels, ctx.packed = window_size, scale, kernels, len(tensors) == 1

    @staticmethod
    def backward(ctx, dout):
        """(dq, dk, dv) or (dqkv,), from what rsir_kernels.routing.backward_kernel names."""
        index, *tensors = ctx.saved_tensors
        q, k, v = unpack(tensors)
        with routing.profiled(ctx.kernels.backend, "backward"):
            dqkv = routing.backward_kernel(ctx.kernels, dout, *tensors)(dout, q, k, v, index, ctx.window_size,
                                                                        ctx.scale)
        return (None, None, None, None, *((dqkv,) if ctx.packed else dqkv.unbind(2)))

    @staticmethod
    def jvp(ctx, _index_t, _window_size_t, _scale_t, _kernels_t, *tangents):
        """The tangent of out from the reference maths; tangents: of (q, k, v) or of (qkv,)."""
        index, *tensors = ctx.saved_tensors
        if ctx.packed:
            tangents = (None,) * 3 if tangents[0] is None else tangents[0].unbind(2)
        return reference.window_attention_jvp(*unpack(tensors), *tangents, index, ctx.window_size, ctx.scale)

    @staticmethod
    def vmap(info, in_dims, index, window_size, scale, kernels, *tensors):
        size = info.batch_size

        def fold(t, dim):  # the mapped dimension (or a broadcast one) into the batch
            t = t.expand(size, *t.shape) if dim is None else t.movedim(dim, 0)
            return t.reshape(size * t.shape[1], *t.shape[2:])

        folded = [fold(t, d) for t, d in zip(tensors, in_dims[4:])]
        out = WindowAttention.apply(fold(index, in_dims[0]).contiguous(), window_size, scale, kernels, *folded)
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
