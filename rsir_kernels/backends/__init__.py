"""Backend registry: each backend registers its forward and backward ops here.

The contract every backend keeps (docs/design.md section 1):

    forward(q, k, v, index, window_size, scale) -> (out, lse)
        q, k, v  (B, L, H, D), any strides, one dtype and device
        index    (B, G, L) int32/int64, contiguous, each row a permutation of 0..L-1;
                 an unchecked row may hold anything, and then, for its group's heads: a
                 token in no window gets out = 0 and dq = dk = dv = 0; an entry outside
                 0..L-1 is an absent slot, neither read nor written (the reference backend
                 raises torch.gather's error instead); a token in several windows gets the
                 rows of one of them
        window_size  1 <= N <= L (rsir_kernels.ops clamps a larger one to L)
        out      (B, L, H, D) contiguous, q's dtype, original token order
        lse      (B, H, L) contiguous, float32 (float64 for float64 inputs): the
                 log-sum-exp of each row's scaled scores, original token order
    backward(dout, q, k, v, out, lse, index, window_size, scale) -> dqkv
        dout     (B, L, H, D), any strides (kernels read it in place, like q, k, v)
        dqkv     (B, L, 3, H, D) contiguous, q's dtype: dq, dk, dv packed, so that a
                 module whose q, k, v are views of one packed qkv gets its gradient
                 with no torch.cat / torch.stack

Both are torch.library ops with fake implementations (`fake_forward`, `fake_backward`, here
for every backend), each backend under op names of its own, written once as constants in its
module. `register` wires autograd for the forward op once, the same way for every backend.
A backend whose ops are Python functions also hands those functions over (`eager_forward`,
`eager_backward`): rsir_kernels.ops calls them directly in plain eager calls, skipping the
dispatcher's round trips through Python (host time that the small stages of a model on a
GPU feel: docs/performance.md, "Lessons that hold"), and calls the ops everywhere else (torch.compile, fake
tensors, dispatch modes such as FLOP counting, tensor subclasses).
Validation is not the backends' job: rsir_kernels.ops checks every input before any op
runs, so a backend may assume well-formed arguments.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Optional

import torch

from .. import reference

# (q, window_size) -> None if this backend can run the inputs, else why not.
CanRun = Callable[[torch.Tensor, int], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward_op: str          # qualified op name, "namespace::name"
    backward_op: str
    priority: dict           # device type -> rank for backend="auto"; absent: never auto
    unavailable: Optional[str] = None   # why this install can't use it, None if it can
    cannot_run: CanRun = lambda q, n: None
    eager_forward: Optional[Callable] = None    # the forward op's implementation; None: the op
    eager_backward: Optional[Callable] = None   # the backward op's implementation; None: the op

    @property
    def forward(self):
        return op_packet(self.forward_op).default

    @property
    def backward(self):
        return op_packet(self.backward_op).default

    @property
    def forward_impl(self):
        """What a plain eager call runs: the op's implementation itself, or the op."""
        return self.eager_forward or self.forward

    @property
    def backward_impl(self):
        return self.eager_backward or self.backward


def op_packet(qualname: str):
    """"namespace::name" -> torch.ops.namespace.name (an OpOverloadPacket)."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


_REGISTRY: dict[str, Backend] = {}
_LOCK = threading.Lock()


def register(backend: Backend) -> None:
    """Adds a backend; when it is available, wires autograd of its forward op."""
    with _LOCK:
        if backend.name in _REGISTRY:
            raise RuntimeError(f"backend {backend.name!r} registered twice")
        _REGISTRY[backend.name] = backend
    if backend.unavailable is None:
        _register_autograd(backend)
        _register_flops(backend)


def get(name: str) -> Backend:
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


def _register_autograd(backend: Backend) -> None:
    def setup_context(ctx, inputs, output):
        q, k, v, index, window_size, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, index)
        ctx.window_size, ctx.scale = window_size, scale

    def backward(ctx, dout, _dlse):  # lse is an auxiliary output: no gradient flows through it
        q, k, v, out, lse, index = ctx.saved_tensors
        if differentiable_backward_needed():
            dqkv = reference.window_attention_vjp(dout, q, k, v, index, ctx.window_size, ctx.scale)
        else:
            dqkv = backend.backward(dout, q, k, v, out, lse, index, ctx.window_size, ctx.scale)
        dq, dk, dv = dqkv.unbind(2)
        return dq, dk, dv, None, None, None

    torch.library.register_autograd(backend.forward_op, backward, setup_context=setup_context)


def differentiable_backward_needed() -> bool:
    """True inside a backward that builds a graph (create_graph=True, torch.func's grad,
    jacrev, hessian): the gradient must then itself be differentiable, which the backward
    ops are not, so it is taken from the reference maths in plain differentiable ops
    (exact second order, at the reference's cost). torch.compile has no double backward;
    there the backward op always runs."""
    return torch.is_grad_enabled() and not torch.compiler.is_compiling()


def fake_forward(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output metadata of every backend's forward op: out (B, L, H, D), lse (B, H, L)."""
    batch, length, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, length), dtype=reference.lse_dtype(q.dtype))


def fake_backward(q: torch.Tensor) -> torch.Tensor:
    """Output metadata of every backend's backward op: dqkv (B, L, 3, H, D)."""
    batch, length, heads, dim = q.shape
    return q.new_empty((batch, length, 3, heads, dim))


def register_fakes(forward_op: str, backward_op: str) -> None:
    """The fake implementations of a backend's forward and backward ops (the contract's
    signatures): what torch.compile, torch.export and FakeTensorMode see."""
    torch.library.register_fake(forward_op)(
        lambda q, k, v, index, window_size, scale: fake_forward(q))
    torch.library.register_fake(backward_op)(
        lambda dout, q, k, v, out, lse, index, window_size, scale: fake_backward(q))


def forward_flops(q_shape, window_size: int) -> int:
    """FLOPs of the forward: q k^T and P v, 2 * N * D multiply-adds per query row (a partial
    last window counted as full)."""
    batch, length, heads, dim = q_shape
    return 2 * 2 * batch * length * heads * min(window_size, length) * dim


def backward_flops(q_shape, window_size: int) -> int:
    """FLOPs of the backward: its five products, 5 * N * D multiply-adds per query row."""
    return forward_flops(q_shape, window_size) * 5 // 2


def _register_flops(backend: Backend) -> None:
    """FLOP formulas for torch.utils.flop_counter, which can't see inside an op."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(op_packet(backend.forward_op))
    def _forward(q_shape, k_shape, v_shape, index_shape, window_size, scale, out_shape=None, **kw):
        return forward_flops(q_shape, window_size)

    @register_flop_formula(op_packet(backend.backward_op))
    def _backward(dout_shape, q_shape, *args, out_shape=None, **kw):
        return backward_flops(q_shape, args[-2])


# Each module registers itself on import; order does not matter (priority decides "auto").
from . import pytorch as _pytorch  # noqa: E402,F401
from . import triton as _triton  # noqa: E402,F401
from . import cpp as _cpp  # noqa: E402,F401
