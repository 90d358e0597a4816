"""How a window_attention call runs: the one place that reads torch's modes and decides.

For validated inputs, `run` takes the backend (`choose_backend`) and the route, once per call:
which autograd.Function applies, if any, and which kernels it runs, the backend's registered
ops or their Python implementations (`backends.Backend.ops` / `.direct`):

    route                        Function                  kernels
    torch.jit.trace              none (graph names the op)  ops
    torch.compile / export       CompiledWindowAttention    ops
    torch.func transform         WindowAttention            ops
    eager, derivative possible   EagerWindowAttention       direct (ops under a dispatch mode,
                                                            fake tensors or a subclass)
    eager, no derivative         none                       likewise

A Function's backward asks `backward_kernel` here, at backward time (it may run under a mode
its forward did not see). Every check of torch's modes in this package lives in this module
(torch.compile, jit tracing, torch.func transforms, grad mode and forward AD, dispatch modes,
fake and meta tensors, CUDA graph capture, the profiler): docs/design.md section 7.
"""
from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD

from . import autograd_functions as functions  # its backward asks this module: bound below
from . import backends, reference

try:  # the innermost TorchDispatchMode (FakeTensorMode, FlopCounterMode, ...), or None
    from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
except ImportError:  # a torch that moved it: always take the op path
    def _current_dispatch_mode():
        return True

# a tensor inside a torch.func transform (grad, jvp, vmap wrap their inputs)
functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", lambda t: False)


class Route(NamedTuple):
    function: Optional[type]      # the autograd.Function to apply; None: call the forward as is
    kernels: backends.Kernels


def run(backend: str, q: torch.Tensor, index: torch.Tensor, window_size: int, scale: float,
        tensors: tuple) -> torch.Tensor:
    """Validated inputs -> out (B, L, H, D) on this call's route.

    q: (B, L, H, D), the query (a view of a packed qkv); tensors: (q, k, v) or (qkv,) packed
    (B, L, 3, H, D); index (B, G, L) contiguous; 1 <= window_size <= L.
    """
    function, kernels = resolve(choose_backend(backend, q, window_size), tensors)
    if function is None:
        return functions.WindowAttention.forward(index, window_size, scale, kernels, *tensors)
    return function.apply(index, window_size, scale, kernels, *tensors)


def resolve(chosen: backends.Backend, tensors: tuple) -> Route:
    """The route of a call to `chosen` on `tensors` (the table in the module docstring)."""
    if torch.jit.is_tracing():  # the forward op, recorded as such (an autograd.Function would be opaque)
        return Route(None, chosen.ops)
    if torch.compiler.is_compiling():
        return Route(functions.CompiledWindowAttention, chosen.ops)
    if any(functorch_wrapped(t) for t in tensors):  # its vmap rule and jvp
        return Route(functions.WindowAttention, chosen.ops)
    kernels = chosen.direct if plain_eager(*tensors) else chosen.ops
    return Route(functions.EagerWindowAttention if needs_autograd(tensors) else None, kernels)


def backward_kernel(kernels: backends.Kernels, *tensors: torch.Tensor):
    """What a Function's backward runs, (dout, q, k, v, index, window_size, scale) -> dqkv,
    for the forward's `kernels` on `tensors` (dout and the saved inputs).

    In a backward that builds a graph (create_graph=True, torch.func's grad, vjp, jacrev,
    hessian) the gradient must itself be differentiable, which the backward ops are not: the
    reference maths in differentiable ops (exact second order at the reference's cost).
    torch.compile has no double backward; there the backward op always runs."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return reference.window_attention_backward
    if kernels.through_ops or plain_eager(*tensors):
        return kernels.backward
    return backends.get(kernels.backend).ops.backward  # a mode the forward did not see


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True when nothing needs the ops: no torch.compile or torch.jit tracing, no dispatch
    mode (fake tensors, FLOP counting, make_fx), plain tensors (no subclass, no torch.func
    transform). Then a backend's Python implementation may run directly, skipping the custom
    ops' dispatch in Python: on a GPU that host time, not the kernels, bounds the small stages
    (docs/performance.md, "Lessons that hold")."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _current_dispatch_mode() is not None:
        return False
    return all(type(t) is torch.Tensor and not functorch_wrapped(t) for t in tensors)


def needs_autograd(tensors) -> bool:
    """Whether a derivative may be taken: reverse mode (grad mode and an input requiring
    grad) or forward mode (a dual level open)."""
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) or fwAD._current_level >= 0


def profiled(backend: str, what: str):
    """A named range for torch.profiler (which, on the direct route, sees no op of ours), only
    while a profiler runs (record_function costs microseconds a call), and never in a graph
    being compiled or traced (there the ops themselves are the graph's named nodes)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()  # (is_compiling first: Dynamo can't trace _profiler_enabled)
    return torch.autograd.profiler.record_function(f"rsir::window_attention_{what} ({backend})")


functions.bind(sys.modules[__name__])  # a Function's backward asks backward_kernel and profiled


# ---------------------------------------------------------------- other mode checks

def compiling() -> bool:
    """torch.compile (Dynamo) traces this code: Python-side caches can't be guarded on."""
    return torch.compiler.is_compiling()


def grad_enabled() -> bool:
    """Autograd records operations (grad mode on, not inference mode or no_grad)."""
    return torch.is_grad_enabled()


_VALUELESS_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, name) for name in ("FAKE", "PROXY", "FUNCTIONAL"))


def index_readable(index: torch.Tensor) -> bool:
    """Whether the index check can read index's values now. Not while torch.compile or
    torch.jit traces (the check would be baked in or break the graph), not on fake or meta
    tensors or under FakeTensorMode / make_fx / functionalization (no values), not on a
    tensor mapped by a torch.func transform, not while a CUDA graph captures (no host sync)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if type(index) is not torch.Tensor or index.is_meta or functorch_wrapped(index):
        return False
    if any(torch._C._get_dispatch_mode(key) is not None for key in _VALUELESS_MODES):
        return False
    return not (index.is_cuda and torch.cuda.is_current_stream_capturing())


# ---------------------------------------------------------------- backend choice

_warned: set = set()
_warned_lock = threading.Lock()


def _warn_once(message: str) -> None:
    with _warned_lock:
        if message in _warned:
            return
        _warned.add(message)
    warnings.warn(message, RuntimeWarning, stacklevel=5)  # the caller of window_attention


def choose_backend(name: str, q: torch.Tensor, window_size: int) -> backends.Backend:
    """The backend that runs q's (B, L, H, D) device, dtype, head dim and window size.

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
