"""Every autograd route through window_attention gives the derivative of the float64 reference
(or finite differences), never a zero or a wrong value: reverse and forward mode, second order,
torch.func transforms, on the eager path and on the op path (inside a dispatch mode).

fp64 for the backends that run it (reference, cpp on CPU); triton (fp32 only) against the
float64 reference within fp32 rounding.
"""
import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.utils.flop_counter import FlopCounterMode

import rsir_kernels as rk
from rsir_kernels import backends, reference

from util import make_index, make_qkv

# Tiny problems: two groups, a partial last window (5 = 3 + 2).
B, L, H, D, N, SCALE = 1, 5, 2, 2, 3, 0.6


def _runnable(dtype):
    probe = torch.empty(1, 1, 1, D, dtype=dtype)
    return [name for name in backends.names()
            if backends.get(name).unavailable is None and backends.get(name).cannot_run(probe, N) is None]


FP64_BACKENDS = _runnable(torch.float64)
PATHS = ["eager", "op"]  # op: inside a dispatch mode, which sends the call through the registered ops


def _path(name):
    return FlopCounterMode(display=False) if name == "op" else contextlib.nullcontext()


def _inputs(seed=0, dtype=torch.float64):
    q, k, v = make_qkv(B, L, H, D, dtype=dtype, device="cpu", packed=False, seed=seed)
    return q, k, v, make_index(B, L, 2, device="cpu", seed=seed + 1)


def _ours(backend, index):
    return lambda q, k, v: rk.window_attention(q, k, v, index, N, scale=SCALE, backend=backend)


def _exact(index):
    return lambda q, k, v: reference.window_attention_reference(q, k, v, index, N, SCALE)


def _assert_close(got, want, tol=1e-10):
    assert got is not None, "no derivative returned"
    err = float((got.double() - want.double()).abs().max()) / max(1.0, float(want.abs().max()))
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    assert want.abs().max() > 0  # the derivative compared is not trivially zero


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradcheck_reverse_forward_and_batched_modes(backend):
    """Finite differences (fast mode: along random directions) for backward, forward AD (dual
    tensors) and their vmapped forms."""
    q, k, v, index = _inputs()
    assert torch.autograd.gradcheck(_ours(backend, index), (q, k, v), check_forward_ad=True,
                                    check_batched_grad=True, check_batched_forward_grad=True, fast_mode=True)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_gradgradcheck_second_order(backend):
    """Finite differences of the gradient: reverse over reverse and forward over reverse."""
    q, k, v, index = _inputs(seed=3)
    assert torch.autograd.gradgradcheck(_ours(backend, index), (q, k, v), check_fwd_over_rev=True, fast_mode=True)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_forward_ad_dual_tensors(backend, path, packed):
    q, k, v, index = _inputs(seed=5)
    tq, tk, tv = (torch.randn_like(t) for t in (q, k, v))
    with torch.no_grad(), fwAD.dual_level(), _path(path):
        if packed:
            qkv = fwAD.make_dual(torch.stack((q, k, v), 2), torch.stack((tq, tk, tv), 2))
            out = rk.window_attention_qkvpacked(qkv, index, N, scale=SCALE, backend=backend)
        else:
            out = _ours(backend, index)(*(fwAD.make_dual(t, dt) for t, dt in ((q, tq), (k, tk), (v, tv))))
        tangent = fwAD.unpack_dual(out).tangent
    _, want = torch.func.jvp(_exact(index), (q, k, v), (tq, tk, tv))
    _assert_close(tangent, want)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "jacrev", "vmap", "func.hessian", "autograd.hessian"])
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_torch_func_transforms_match_reference(backend, transform):
    """Each transform of our op against the same transform of the float64 reference maths."""
    q, k, v, index = _inputs(seed=7)
    q, k, v = (t.detach() for t in (q, k, v))
    ours, exact = _ours(backend, index), _exact(index)
    tq = torch.randn_like(q)
    qs = torch.randn(3, *q.shape, dtype=q.dtype)

    def apply(f):
        loss = lambda a: (f(a, k, v) * torch.cos(f(a, k, v))).sum()  # noqa: E731
        return {
            "jvp": lambda: torch.func.jvp(lambda a: f(a, k, v), (q,), (tq,))[1],
            "jacfwd": lambda: torch.func.jacfwd(lambda a: f(a, k, v))(q),
            "jacrev": lambda: torch.func.jacrev(lambda a: f(a, k, v))(q),
            "vmap": lambda: torch.func.vmap(lambda a: f(a, k, v))(qs),
            "func.hessian": lambda: torch.func.hessian(loss)(q),
            "autograd.hessian": lambda: torch.autograd.functional.hessian(loss, q),
        }[transform]()

    _assert_close(apply(ours), apply(exact))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_create_graph_second_order(backend, path):
    """autograd.grad(create_graph=True) then a gradient of that gradient (materialize_grads:
    a missing graph would read as zeros)."""
    q, k, v, index = _inputs(seed=9)
    dout = torch.randn_like(q)

    def second(f):
        with _path(path) if f is not exact else contextlib.nullcontext():
            out = f(q, k, v)
            grads = torch.autograd.grad(out, (q, k, v), dout, create_graph=True)
            loss = sum((g * g).sum() for g in grads)
            return torch.autograd.grad(loss, (q, k, v), materialize_grads=True)

    exact = _exact(index)
    for got, want in zip(second(_ours(backend, index)), second(exact)):
        _assert_close(got, want)


@pytest.mark.parametrize("in_dims", [(0, 0, 0, None), (None, 1, None, 0)], ids=["qkv", "k-and-index"])
@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_vmap_over_inputs_and_index(backend, in_dims):
    """vmap folds the mapped dim into the batch: each slice equals its own call."""
    q, k, v, index = _inputs(seed=11)
    q, k, v = (t.detach() for t in (q, k, v))
    pairs = ((q, q.flip(1)), (k, k * 2), (v, -v), (index, index.flip(-1)))
    args = [torch.stack(p, dim=d) if d is not None else p[0] for p, d in zip(pairs, in_dims)]
    got = torch.func.vmap(lambda a, b, c, i: rk.window_attention(a, b, c, i, N, scale=SCALE, backend=backend),
                          in_dims=in_dims)(*args)
    for m in range(2):
        sliced = [a.select(d, m) if d is not None else a for a, d in zip(args, in_dims)]
        _assert_close(got[m], _exact(sliced[3])(*sliced[:3]))


@pytest.mark.skipif("triton" not in _runnable(torch.float32), reason="triton cannot run here")
def test_triton_forward_mode_and_second_order():
    """triton takes the same routes (fp32): jvp and create_graph against the float64 reference."""
    q, k, v, index = _inputs(seed=13, dtype=torch.float32)
    ours, exact = _ours("triton", index), _exact(index)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    tangents = [torch.randn_like(t) for t in wide]
    _, tangent = torch.func.jvp(ours, tuple(t.detach() for t in (q, k, v)), tuple(t.float() for t in tangents))
    _assert_close(tangent, torch.func.jvp(exact, tuple(t.detach() for t in wide), tuple(tangents))[1], tol=1e-5)
    (dq,) = torch.autograd.grad(ours(q, k, v).pow(2).sum(), q, create_graph=True)
    (dq_exact,) = torch.autograd.grad(exact(*wide).pow(2).sum(), wide[0], create_graph=True)
    _assert_close(torch.autograd.grad(dq.pow(2).sum(), k)[0], torch.autograd.grad(dq_exact.pow(2).sum(), wide[1])[0],
                  tol=1e-5)


@pytest.mark.parametrize("backend", FP64_BACKENDS)
def test_qkvpacked_under_torch_func(backend):
    """The packed entry point takes the same transforms: its packed tangent and jacobian."""
    q, k, v, index = _inputs(seed=15)
    qkv = torch.stack((q, k, v), 2).detach()
    ours = lambda t: rk.window_attention_qkvpacked(t, index, N, scale=SCALE, backend=backend)  # noqa: E731
    exact = lambda t: _exact(index)(*t.unbind(2))  # noqa: E731
    tangent = torch.randn_like(qkv)
    _assert_close(torch.func.jvp(ours, (qkv,), (tangent,))[1], torch.func.jvp(exact, (qkv,), (tangent,))[1])
    _assert_close(torch.func.jacrev(ours)(qkv), torch.func.jacrev(exact)(qkv))
