"""The op layer: registered ops (opcheck, gradcheck), the packed variant, validation, index checks."""
import warnings

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import ops, reference, routing

from util import assert_matches_reference, make_index, make_qkv


def _ref_backend(q, k, v, index, n, scale=None):
    return rk.window_attention(q, k, v, index, n, scale=scale, backend="reference")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("length,n,groups", [(98, 49, 2), (103, 49, 1), (40, 7, 4)])
def test_reference_op_matches_reference(dtype, length, n, groups):
    q, k, v = make_qkv(2, length, 4, 16, dtype=dtype, device="cpu")
    assert_matches_reference(_ref_backend, q, k, v, make_index(2, length, groups, device="cpu"), n)


def test_opcheck_registered_ops():
    q, k, v = make_qkv(2, 30, 4, 8, dtype=torch.float64, device="cpu")
    index = make_index(2, 30, 2, device="cpu", dtype=torch.int32)
    q, k, v = q.detach(), k.detach(), v.detach()  # the ops carry no autograd (the Function's job)
    out, lse = torch.ops.rsir.window_attention(q, k, v, index, 7, 0.3)
    torch.library.opcheck(torch.ops.rsir.window_attention.default, (q, k, v, index, 7, 0.3))
    torch.library.opcheck(torch.ops.rsir.window_attention_backward.default,
                          (torch.randn_like(out), q, k, v, index, 7, 0.3))


def test_gradcheck_float64():
    q, k, v = make_qkv(1, 11, 2, 3, dtype=torch.float64, device="cpu", packed=False)
    index = make_index(1, 11, 2, device="cpu")
    assert torch.autograd.gradcheck(lambda a, b, c: _ref_backend(a, b, c, index, 4), (q, k, v))
    qkv = torch.stack((q, k, v), dim=2).detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda t: rk.window_attention_qkvpacked(t, index, 4, backend="reference"), (qkv,))


def test_qkvpacked_matches_separate_and_returns_one_packed_gradient():
    q, k, v = make_qkv(2, 60, 4, 8, device="cpu")
    qkv = q._base
    index = make_index(2, 60, 2, device="cpu")
    packed = rk.window_attention_qkvpacked(qkv, index, 9, backend="reference")
    separate = rk.window_attention(q, k, v, index, 9, backend="reference")
    assert torch.equal(packed, separate)
    dout = torch.randn_like(packed)
    (dqkv,) = torch.autograd.grad(packed, qkv, dout)
    expected = torch.stack(torch.autograd.grad(separate, (q, k, v), dout), dim=2)
    assert torch.equal(dqkv, expected)
    # the packed path's graph has no stack/cat of q, k, v gradients
    node = packed.grad_fn
    assert "Unbind" not in type(node).__name__ and "Stack" not in type(node).__name__


def test_g_equals_h_and_scale():
    q, k, v = make_qkv(2, 50, 4, 8, device="cpu")
    assert_matches_reference(_ref_backend, q, k, v, make_index(2, 50, 4, device="cpu"), 16, scale=0.05)


@pytest.mark.parametrize("shape", [(0, 10, 2, 4), (2, 0, 2, 4)])
def test_empty_inputs_return_empty(shape):
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    index = torch.zeros(shape[0], 1, shape[1], dtype=torch.int64)
    out = rk.window_attention(q, k, v, index, 7)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad.shape == shape


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv(1, 20, 2, 9, device="cpu", requires_grad=False)
    index = make_index(1, 20, 1, device="cpu")
    assert torch.equal(_ref_backend(q, k, v, index, 5), _ref_backend(q, k, v, index, 5, scale=9 ** -0.5))


# ---------------------------------------------------------------- bad inputs

def _good():
    q, k, v = make_qkv(2, 12, 4, 8, device="cpu", requires_grad=False)
    return dict(q=q, k=k, v=v, index=make_index(2, 12, 2, device="cpu"), window_size=4)


def _call(**changes):
    args = {**_good(), **changes}
    kwargs = {key: args.pop(key) for key in ("scale", "backend", "check_index") if key in args}
    return rk.window_attention(args["q"], args["k"], args["v"], args["index"], args["window_size"], **kwargs)


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor, got list"),
    (dict(index=None), TypeError, "index must be a torch.Tensor, got NoneType"),
    (dict(q=torch.randn(2, 12, 32)), ValueError, r"q must be 4-D \(B, L, H, D\), got shape \(2, 12, 32\)"),
    (dict(k=torch.randn(2, 12, 4, 4)), ValueError, r"k must have q's shape \(2, 12, 4, 8\), got \(2, 12, 4, 4\)"),
    (dict(v=torch.randn(2, 12, 4, 8, dtype=torch.float64)), TypeError, "v must have q's dtype torch.float32, got torch.float64"),
    (dict(q=torch.ones(2, 12, 4, 8, dtype=torch.int32), k=torch.ones(2, 12, 4, 8, dtype=torch.int32),
          v=torch.ones(2, 12, 4, 8, dtype=torch.int32)), TypeError, "q must be one of .* got torch.int32"),
    (dict(index=torch.zeros(2, 12, dtype=torch.int64)), ValueError, r"index must have shape \(B, G, L\) = \(2, G, 12\), got \(2, 12\)"),
    (dict(index=torch.zeros(2, 2, 11, dtype=torch.int64)), ValueError, r"got \(2, 2, 11\)"),
    (dict(index=torch.zeros(2, 2, 12)), TypeError, "index must be torch.int32 or torch.int64, got torch.float32"),
    (dict(index=torch.zeros(2, 3, 12, dtype=torch.int64)), ValueError, "G=3 must divide the head count H=4"),
    (dict(window_size=0), ValueError, "window_size must be >= 1, got 0"),
    (dict(window_size=4.0), TypeError, "window_size must be an int, got float"),
    (dict(scale="x"), TypeError, "scale must be a float or None, got str"),
    (dict(scale=float("nan")), ValueError, r"scale must be finite in torch.float32, .* got nan"),
    (dict(scale=-float("inf")), ValueError, r"scale must be finite in torch.float32, .* got -inf"),
    # finite in float64, infinite in float32, where fp32 inputs are computed: every score NaN
    (dict(scale=1e300), ValueError, r"scale must be finite in torch.float32, the compute precision of "
                                    r"torch.float32 inputs \(\|scale\| <= 1.701e\+38\), got 1e\+300"),
    (dict(scale=2e38), ValueError, r"scale must be finite in torch.float32, .* got 2e\+38"),
    (dict(scale=10 ** 400), ValueError, "scale must be finite in torch.float32, .* got an int beyond float64"),
    (dict(backend="cuda"), ValueError, "backend must be 'auto' or one of .*got 'cuda'"),
])
def test_bad_inputs_raise_named_errors(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        _call(**changes)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
@pytest.mark.parametrize("window_size", [12, 13, 2 ** 64, 10 ** 30])
def test_window_size_beyond_length_is_one_window(window_size, packed):
    """Any int N >= L is one window of all L tokens: the same as N = L (brute force: one
    softmax over the whole row order), on every backend, with no overflow of an op's int."""
    args = _good()
    q, k, v, index = (args[name] for name in ("q", "k", "v", "index"))
    for name in _runnable(q, 12):
        if packed:
            out = rk.window_attention_qkvpacked(torch.stack((q, k, v), 2), index, window_size, backend=name)
        else:
            out = rk.window_attention(q, k, v, index, window_size, backend=name)
        heads = q.shape[2]
        for h in range(heads):
            order = index[:, h // (heads // index.shape[1])]  # (B, L)
            qs, ks, vs = (torch.gather(t[:, :, h], 1, order[..., None].expand(-1, -1, t.shape[-1]))
                          for t in (q, k, v))
            full = torch.softmax(qs @ ks.transpose(1, 2) * 8 ** -0.5, -1) @ vs  # (B, L, D) in index order
            want = torch.empty_like(full).scatter_(1, order[..., None].expand_as(full), full)
            assert torch.allclose(out[:, :, h], want, atol=1e-5, rtol=1e-5), name


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_scale_finite_in_float64_gives_hard_attention(backend):
    """scale=1e300 is finite in float64, the compute precision of fp64 inputs: the result is
    the limit of the softmax, each query taking the v of its window's highest-scoring key."""
    if backend not in _runnable(torch.empty(1, 1, 1, 1, dtype=torch.float64), 4):
        pytest.skip(f"{backend} cannot run float64 here")
    args = _good()
    q, k, v = (args[name].double() for name in ("q", "k", "v"))
    index, n = args["index"], args["window_size"]
    out = rk.window_attention(q, k, v, index, n, scale=1e300, backend=backend)
    heads = q.shape[2]
    for b in range(q.shape[0]):
        for h in range(heads):
            order = index[b, h // (heads // index.shape[1])]
            for start in range(0, q.shape[1], n):
                win = order[start:start + n]
                best = (q[b, win, h] @ k[b, win, h].T).argmax(-1)
                assert torch.equal(out[b, win, h], v[b, win[best], h])


def test_bad_index_device_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device")
    with pytest.raises(ValueError, match="index must be on q's device"):
        _call(index=_good()["index"].cuda())


@pytest.mark.parametrize("corrupt,pattern", [
    (lambda idx: idx[1, 0].__setitem__(3, 12), r"index\[1, 0\] is not a permutation of 0..11: it holds 12"),
    (lambda idx: idx[0, 1].__setitem__(0, -1), r"index\[0, 1\] is not a permutation of 0..11: it holds -1"),
    (lambda idx: idx[1, 1].__setitem__(5, idx[1, 1, 6].item()), r"index\[1, 1\] is not a permutation.*appears 2 times"),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_check_index_names_the_first_bad_row(corrupt, pattern, dtype):
    args = _good()
    index = args["index"].to(dtype).clone()
    corrupt(index)
    with pytest.raises(ValueError, match=pattern):
        _call(index=index)


def _first_bad_row_by_definition(index):
    """b * G + g of the first row that is not a permutation of 0..L-1 (sorted != range), or -1."""
    rows = index.reshape(-1, index.shape[-1]).tolist()
    return next((r for r, row in enumerate(rows) if sorted(row) != list(range(len(row)))), -1)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_native_index_check_matches_the_definition_and_the_tensor_ops(dtype, monkeypatch):
    """The C++ check of CPU indexes (csrc/torch/index_check.cpp) against the definition, and its
    error against the device-generic check's, on random rows with random defects."""
    native = ops._native_index_check()
    if native is None:
        pytest.skip("the ops library (cpp backend) is not built")
    gen = torch.Generator().manual_seed(5)
    for case in range(200):
        batch, groups, length = (int(torch.randint(1, hi, (1,), generator=gen)) for hi in (5, 4, 70))
        index = torch.stack([torch.randperm(length, generator=gen) for _ in range(batch * groups)])
        for row in torch.randperm(batch * groups, generator=gen)[:int(torch.randint(0, 3, (1,), generator=gen))]:
            pos = int(torch.randint(0, length, (1,), generator=gen))
            kind = case % 4  # a duplicate, below 0, at L, far out
            value = [int(index[row, (pos + 1) % length]), -1, length, 2 ** 31 - 1][kind]
            if length > 1 or kind:
                index[row, pos] = value
        index = index.view(batch, groups, length).to(dtype)
        if case % 3 == 0:  # not contiguous
            index = index.transpose(0, 1).contiguous().transpose(0, 1)
        expected = _first_bad_row_by_definition(index)
        assert native(index) == expected
        errors = []
        for path in (native, False):
            monkeypatch.setattr(ops, "_native_check", path)
            try:
                ops._check_index(index)
                errors.append(None)
            except ValueError as exc:
                errors.append(str(exc))
        assert errors[0] == errors[1]
        assert (errors[0] is None) == (expected < 0)
        if expected >= 0:
            assert errors[0].startswith(f"index[{expected // groups}, {expected % groups}] is not a permutation")


def test_unavailable_backend_raises_with_reason_and_auto_warns_once(monkeypatch):
    from rsir_kernels import backends
    missing = backends.Backend(name="missing", forward_op="x::y", backward_op="x::z", priority={"cpu": 99},
                               unavailable="not built in this test")
    monkeypatch.setitem(backends.registry._REGISTRY, "missing", missing)
    with pytest.raises(RuntimeError, match="backend 'missing' is not available in this install: not built in this test"):
        _call(backend="missing")
    monkeypatch.setattr(routing, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _call()
        _call()
    messages = [str(w.message) for w in caught if "missing" in str(w.message)]
    assert len(messages) == 1 and "not built in this test" in messages[0]


def test_backend_that_cannot_run_inputs_raises_when_explicit(monkeypatch):
    from rsir_kernels import backends
    ref = backends.get("reference")
    picky = backends.Backend(name="picky", forward_op=ref.forward_op, backward_op=ref.backward_op,
                             priority={"cpu": 99}, cannot_run=lambda q, n: f"window {n} too large")
    monkeypatch.setitem(backends.registry._REGISTRY, "picky", picky)
    with pytest.raises(ValueError, match="backend 'picky' cannot run these inputs: window 4 too large"):
        _call(backend="picky")
    assert routing.choose_backend("auto", _good()["q"], 4).name != "picky"


def test_available_backends_reports_every_backend():
    status = rk.available_backends()
    assert status["reference"] == (True, "")
    for name in ("triton", "cpp"):
        assert name in status
        assert status[name].available or status[name].reason


def test_strided_output_gradient_reaches_every_backend():
    """The backward ops read dout in place: a non-contiguous dout (here a transposed view) must
    give the gradients of its values, on every backend that runs here."""
    from rsir_kernels import backends
    q, k, v = make_qkv(2, 30, 4, 8, device="cpu")
    index = make_index(2, 30, 2, device="cpu")
    dout = torch.randn(2, 4, 30, 8).transpose(1, 2)  # (B, L, H, D), not contiguous
    expected = torch.autograd.grad(reference.window_attention_reference(q, k, v, index, 7), (q, k, v), dout)
    probe = q.detach()
    for name in backends.names():
        b = backends.get(name)
        if b.unavailable or b.cannot_run(probe, 7):
            continue
        out = rk.window_attention(q, k, v, index, 7, backend=name)
        for got, want in zip(torch.autograd.grad(out, (q, k, v), dout), expected):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), name


def _runnable(q, window_size):
    from rsir_kernels import backends
    return [name for name in backends.names()
            if not backends.get(name).unavailable and not backends.get(name).cannot_run(q, window_size)]


def _forward_and_grads(fn, leaves, dout):
    out = fn()
    return (out, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
def test_eager_path_equals_op_path_and_flops_are_counted(packed):
    """A plain eager call runs the backends' implementations directly
    (routing.plain_eager); a dispatch mode (here the FLOP counter) sends the same
    call through the ops. Both paths
    must give the same bits, and the op path must show the registered FLOP formulas."""
    from torch.utils.flop_counter import FlopCounterMode
    from util import DEVICE
    batch, length, heads, dim, window = 2, 60, 4, 16, 7
    q, k, v = make_qkv(batch, length, heads, dim, device=DEVICE)
    qkv = q._base
    index = make_index(batch, length, 2, device=DEVICE)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    for name in _runnable(q.detach(), window):
        if packed:
            call = lambda: rk.window_attention_qkvpacked(qkv, index, window, backend=name)  # noqa: E731
            leaves = (qkv,)
        else:
            call = lambda: rk.window_attention(q, k, v, index, window, backend=name)  # noqa: E731
            leaves = (q, k, v)
        assert routing.plain_eager(q, index)
        eager = _forward_and_grads(call, leaves, dout)
        with FlopCounterMode(display=False) as counter:
            through_ops = _forward_and_grads(call, leaves, dout)
        for a, b in zip(eager, through_ops):
            assert torch.equal(a, b), name
        macs = batch * length * heads * window * dim
        assert counter.get_total_flops() == 2 * 2 * macs + 2 * 5 * macs, name


def test_fake_tensors_take_the_op_path():
    """Under FakeTensorMode (shape inference, tracing) the ops' fake implementations answer;
    the default index check steps aside (a fake index has no values to check)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q = torch.empty(2, 30, 4, 8)
        index = torch.empty(2, 2, 30, dtype=torch.int64)
        out = rk.window_attention(q, q, q, index, 7)
        assert out.shape == (2, 30, 4, 8) and out.dtype == torch.float32
        assert not routing.plain_eager(q, index)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
def test_meta_tensors_give_shapes_with_the_default_check(packed):
    q = torch.empty(2, 30, 4, 8, device="meta")
    index = torch.empty(2, 2, 30, dtype=torch.int64, device="meta")
    if packed:
        out = rk.window_attention_qkvpacked(torch.empty(2, 30, 3, 4, 8, device="meta"), index, 7, backend="reference")
    else:
        out = rk.window_attention(q, q, q, index, 7, backend="reference")
    assert out.shape == (2, 30, 4, 8) and out.device.type == "meta"


def test_make_fx_traces_with_the_default_check():
    """make_fx (symbolic tracing under a proxy mode) records the op; the check steps aside."""
    from torch.fx.experimental.proxy_tensor import make_fx
    q, k, v = make_qkv(1, 20, 2, 8, device="cpu", requires_grad=False)
    index = make_index(1, 20, 1, device="cpu")
    graph = make_fx(lambda a, b, c, i: rk.window_attention(a, b, c, i, 5, backend="reference"),
                    tracing_mode="fake")(q, k, v, index)
    assert "rsir.window_attention" in str(graph.code)
    q2, k2, v2 = make_qkv(1, 20, 2, 8, device="cpu", requires_grad=False, seed=9)
    want = reference.window_attention_reference(q2, k2, v2, index, 5)
    assert torch.allclose(graph(q2, k2, v2, index), want, atol=1e-6, rtol=1e-5)


def test_jit_trace_records_the_forward_op_and_has_no_derivative():
    """torch.jit.trace sees only dispatched ops: a traced call must record the backend's forward
    op (what FLOP counters that trace read), not the eager path's direct kernel call nor an
    autograd.Function (an opaque PythonOp). The traced graph has no derivative: its backward
    raises rather than giving a wrong gradient. The default index check steps aside: its host
    sync would bake the traced index's verdict in."""
    q, k, v = make_qkv(1, 20, 2, 8, device="cpu", requires_grad=False)
    index = make_index(1, 20, 1, device="cpu")
    traced = torch.jit.trace(lambda a, b, c: rk.window_attention(a, b, c, index, 5, backend="reference"), (q, k, v))
    assert "rsir::window_attention" in str(traced.graph)
    q2, k2, v2 = make_qkv(1, 20, 2, 8, device="cpu", seed=9)
    want = reference.window_attention_reference(q2, k2, v2, index, 5)
    got = traced(q2, k2, v2)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(got, (q2, k2, v2), torch.randn_like(want))


def test_index_check_still_runs_where_values_are_readable():
    """Stepping aside is for tracing only: inside a dispatch mode and a torch.func transform
    (index not mapped) a bad index still raises."""
    from torch.utils.flop_counter import FlopCounterMode
    args = _good()
    bad = args["index"].clone()
    bad[0, 1, 3] = bad[0, 1, 4]
    with pytest.raises(ValueError, match=r"index\[0, 1\] is not a permutation"):
        with FlopCounterMode(display=False):
            _call(index=bad)
    with pytest.raises(ValueError, match=r"index\[0, 1\] is not a permutation"):
        torch.func.grad(lambda q: rk.window_attention(q, args["k"], args["v"], bad, 4).sum())(args["q"])


def test_profiler_names_the_eager_path():
    q, k, v = make_qkv(1, 20, 2, 8, device="cpu")
    index = make_index(1, 20, 1, device="cpu")
    with torch.profiler.profile() as prof:
        rk.window_attention(q, k, v, index, 5, backend="reference").sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"rsir::window_attention_forward (reference)", "rsir::window_attention_backward (reference)"} <= names


@pytest.mark.gpu
def test_cuda_graph_capture_replays_forward_and_backward():
    """Small stages are bound by host time; CUDA graphs are the remedy, so the default call
    (check_index=True included: its host sync is skipped while capturing) must capture, and a
    replay on new inputs must give the eager result bit for bit."""
    q, _, _ = make_qkv(2, 98, 4, 16, torch.bfloat16, device="cuda")
    qkv = q._base
    index = make_index(2, 98, 2, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)

    def step():
        out = rk.window_attention_qkvpacked(qkv, index, 49)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_grad = step()
    with torch.no_grad():
        qkv.copy_(torch.randn_like(qkv))
        index.copy_(make_index(2, 98, 2, device="cuda", seed=7))
    graph.replay()
    out, grad = step()
    assert torch.equal(static_out, out) and torch.equal(static_grad, grad)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "qkvpacked"])
def test_a_call_saves_only_its_inputs_and_index(packed):
    """No backward reads out or lse (every backward recomputes the softmax): autograd keeps
    qkv (or q, k, v: views of it) and the index, counted by storage, on every backend."""
    from benchmarks.common.measure import saved_bytes
    q, k, v = make_qkv(2, 60, 4, 8, device="cpu")
    qkv = q._base
    index = make_index(2, 60, 2, device="cpu")
    for name in _runnable(q.detach(), 7):
        if packed:
            kept, _ = saved_bytes(rk.window_attention_qkvpacked, qkv, index, 7, backend=name)
        else:
            kept, _ = saved_bytes(rk.window_attention, q, k, v, index, 7, backend=name)
        assert kept == qkv.nbytes + index.nbytes, name


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_every_route_gives_the_same_bits(backend):
    """One Function on every route, the same kernels inside: a plain eager call (the eager
    shell, the backend's implementation), the same call under a dispatch mode (the ops) and
    torch.compile (CompiledWindowAttention, its forward and backward graphs run by aot_eager)
    give the same out and packed gradient bits. A torch.func transform (WindowAttention) gives
    the same out; its backward builds a graph, so its gradient is the reference maths' (the
    one fallback, routing.backward_kernel), bit for bit."""
    from rsir_kernels import backends
    from torch.utils.flop_counter import FlopCounterMode
    if backends.get(backend).unavailable is not None:
        pytest.skip(backends.get(backend).unavailable)
    q, _, _ = make_qkv(2, 60, 4, 8, device="cpu")
    qkv = q._base.detach().requires_grad_()
    index = make_index(2, 60, 2, device="cpu")
    dout = torch.randn(2, 60, 4, 8, generator=torch.Generator().manual_seed(3))

    def attend(t):
        return rk.window_attention_qkvpacked(t, index, 7, backend=backend, check_index=False)

    def eager():
        out = attend(qkv)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    def transformed():
        out, vjp = torch.func.vjp(attend, qkv.detach())
        return out, vjp(dout)[0]

    torch._dynamo.reset()
    compiled_attend = torch.compile(attend, fullgraph=True, backend="aot_eager")

    def compiled():
        out = compiled_attend(qkv)
        return out, torch.autograd.grad(out, qkv, dout)[0]

    expected = eager()
    with FlopCounterMode(display=False):
        through_ops = eager()
    for route, got in (("ops", through_ops), ("torch.compile", compiled())):
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), route
    out, dqkv = transformed()
    q, k, v = qkv.detach().unbind(2)
    assert torch.equal(out, expected[0])
    assert torch.equal(dqkv, reference.window_attention_backward(dout, q, k, v, index, 7, 8 ** -0.5))
