"""The backend registry: `Backend` and `Kernels`, `register` / `get` / `names`, the fake
implementations every backend's ops share, and the FLOP formulas torch's counter reads. The
contract each backend keeps is the package's docstring (rsir_kernels/backends/__init__.py)."""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Optional

import torch

from .. import reference

# (q, window_size) -> None if this backend can run the inputs, else why not.
CanRun = Callable[[torch.Tensor, int], Optional[str]]


@dataclasses.dataclass(frozen=True)
class Kernels:
    """A backend's forward and backward (the contract above) as one route calls them."""
    backend: str
    forward: Callable     # (q, k, v, index, window_size, scale) -> (out, lse)
    backward: Callable    # (dout, q, k, v, index, window_size, scale) -> dqkv
    through_ops: bool     # the registered ops (what graphs and dispatch modes see)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    forward_op: str          # qualified op name, "namespace::name"
    backward_op: str
    priority: dict           # device type -> rank for backend="auto"; absent: never auto
    unavailable: Optional[str] = None   # why this install can't use it, None if it can
    cannot_run: CanRun = lambda q, n: None
    eager_forward: Optional[Callable] = None    # the forward op's Python implementation, if any
    eager_backward: Optional[Callable] = None
    # Set here once, from the fields above (None while unavailable): the registered ops, and
    # what a plain eager call runs, the Python implementations or, for a backend without
    # them (cpp: a C++ op), the ops themselves.
    ops: Optional[Kernels] = dataclasses.field(default=None, init=False, compare=False, repr=False)
    direct: Optional[Kernels] = dataclasses.field(default=None, init=False, compare=False, repr=False)

    def __post_init__(self):
        if self.unavailable is not None:
            return
        ops = Kernels(self.name, op_packet(self.forward_op).default, op_packet(self.backward_op).default, True)
        direct = ops if self.eager_forward is None else Kernels(self.name, self.eager_forward,
                                                                self.eager_backward, False)
        object.__setattr__(self, "ops", ops)  # frozen: set once, at construction
        object.__setattr__(self, "direct", direct)


def op_packet(qualname: str):
    """"namespace::name" -> torch.ops.namespace.name (an OpOverloadPacket)."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


_REGISTRY: dict[str, Backend] = {}
_LOCK = threading.Lock()


def register(backend: Backend) -> None:
    """Adds a backend; when it is available, registers its FLOP formulas."""
    with _LOCK:
        if backend.name in _REGISTRY:
            raise RuntimeError(f"backend {backend.name!r} registered twice")
        _REGISTRY[backend.name] = backend
    if backend.unavailable is None:
        _register_flops(backend)


def get(name: str) -> Backend:
    return _REGISTRY[name]


def names() -> list[str]:
    return list(_REGISTRY)


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
        lambda dout, q, k, v, index, window_size, scale: fake_backward(q))


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
    def _backward(dout_shape, q_shape, k_shape, v_shape, index_shape, window_size, scale, out_shape=None, **kw):
        return backward_flops(q_shape, window_size)
