"""Backend `cpp` (the compiled extension rsir_kernels._C): forward and the three gradients
against the reference, gradcheck, opcheck, determinism, thread-count independence, bad
indices. CPU here; the CUDA kernels in tests marked gpu (skipped without a GPU).

Outputs are poisoned: RSIR_POISON=1 makes the C++ ops allocate their outputs filled with
NaN, so a row a kernel forgets to write fails the comparison.
"""
import os

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import backends
from rsir_kernels.backends import cpp

from util import assert_matches_reference, make_index, make_qkv

AVAILABLE = rk.available_backends()["cpp"]
# Skipped when the extension is not built, unless RSIR_REQUIRE_EXT=1 (then they fail).
REQUIRE_EXT = os.environ.get("RSIR_REQUIRE_EXT", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not AVAILABLE.available and not REQUIRE_EXT,
                                reason=f"backend 'cpp' unavailable: {AVAILABLE.reason}")

fwd_op = lambda: torch.ops.rsir_ext.window_attention_fwd.default  # noqa: E731
bwd_op = lambda: torch.ops.rsir_ext.window_attention_bwd.default  # noqa: E731


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("RSIR_POISON", "1")


def cpp_attention(q, k, v, idx, n, scale=None):
    return rk.window_attention(q, k, v, idx, n, scale=scale, backend="cpp")


def test_extension_loaded():
    assert AVAILABLE.available, AVAILABLE.reason
    assert cpp.CPU_ISA in ("avx512", "avx2+fma", "generic")


# (B, L, H, D, G, N): full windows, a partial last window, G = H, a window longer than L,
# odd head dims
SHAPES = [
    (2, 98, 4, 16, 2, 49),
    (1, 100, 4, 24, 1, 49),
    (2, 37, 4, 32, 4, 7),
    (1, 20, 2, 64, 2, 49),
    (1, 30, 3, 5, 3, 9),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}L{}H{}D{}G{}N{}".format(*s))
@pytest.mark.parametrize("packed,index_dtype", [(True, torch.int32), (False, torch.int64)],
                         ids=["packed-i32", "separate-i64"])
def test_fp32_matches_reference(shape, packed, index_dtype):
    batch, length, heads, dim, groups, n = shape
    q, k, v = make_qkv(batch, length, heads, dim, device="cpu", packed=packed)
    idx = make_index(batch, length, groups, device="cpu", dtype=index_dtype)
    assert_matches_reference(cpp_attention, q, k, v, idx, n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[1], SHAPES[2]], ids=lambda s: "B{}L{}H{}D{}G{}N{}".format(*s))
def test_other_dtypes_match_reference(dtype, shape):
    batch, length, heads, dim, groups, n = shape
    q, k, v = make_qkv(batch, length, heads, dim, dtype=dtype, device="cpu", packed=True)
    idx = make_index(batch, length, groups, device="cpu", dtype=torch.int64)
    assert_matches_reference(cpp_attention, q, k, v, idx, n)


@pytest.mark.parametrize("n", [1, 120], ids=["N1", "N=L"])
def test_window_extremes(n):
    q, k, v = make_qkv(1, 120, 2, 16, device="cpu", packed=True)
    idx = make_index(1, 120, 2, device="cpu")
    assert_matches_reference(cpp_attention, q, k, v, idx, n)


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(2, 50, 4, 8, device="cpu", packed=True)
    idx = make_index(2, 50, 2, device="cpu")
    compiled = torch.compile(lambda q, k, v, idx: cpp_attention(q, k, v, idx, 7), fullgraph=True)
    out = compiled(q, k, v, idx)
    ref = rk.reference.window_attention_reference(q, k, v, idx, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_custom_scale_and_non_unit_dim_stride():
    # q, k, v with a non-unit stride along the head dim (a transposed buffer), scale given
    base = torch.randn(2, 16, 60, 4, dtype=torch.float32)  # (B, D, L, H)
    q, k, v = ((base.permute(0, 2, 3, 1) + i).detach().requires_grad_() for i in range(3))
    assert q.stride(-1) != 1
    idx = make_index(2, 60, 2, device="cpu")
    assert_matches_reference(cpp_attention, q, k, v, idx, 13, scale=0.3)


def test_qkvpacked_matches_reference():
    qkv = torch.randn(2, 50, 3, 4, 16, requires_grad=True)
    idx = make_index(2, 50, 2, device="cpu")
    out = rk.window_attention_qkvpacked(qkv, idx, 7, backend="cpp")
    ref = rk.reference.window_attention_reference(*qkv.unbind(2), idx, 7)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    dout = torch.randn_like(out)
    (g,) = torch.autograd.grad(out, qkv, dout)
    (g_ref,) = torch.autograd.grad(ref, qkv, dout)
    torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    q, k, v = make_qkv(1, 11, 2, 4, dtype=torch.float64, device="cpu", packed=True)
    idx = make_index(1, 11, 2, device="cpu")
    torch.autograd.gradcheck(lambda q, k, v: cpp_attention(q, k, v, idx, 4), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck(dtype):
    q, k, v = make_qkv(2, 20, 4, 8, dtype=dtype, device="cpu", packed=True)
    idx = make_index(2, 20, 2, device="cpu", dtype=torch.int32)
    torch.library.opcheck(fwd_op(), (q, k, v, idx, 7, 0.35))
    with torch.no_grad():
        out, lse = fwd_op()(q, k, v, idx, 7, 0.35)
    dout = torch.randn_like(out)
    torch.library.opcheck(bwd_op(), (dout, q.detach(), k.detach(), v.detach(), out, lse, idx, 7, 0.35))


def test_lse_and_output_layout():
    q, k, v = make_qkv(2, 30, 4, 8, device="cpu", packed=True, requires_grad=False)
    idx = make_index(2, 30, 2, device="cpu")
    out, lse = fwd_op()(q, k, v, idx, 7, 8 ** -0.5)
    ref_out, ref_lse = rk.reference.window_attention_with_lse(q, k, v, idx, 7, 8 ** -0.5)
    assert out.is_contiguous() and lse.is_contiguous()
    assert lse.shape == (2, 4, 30) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    dqkv = bwd_op()(torch.randn_like(out), q, k, v, out, lse, idx, 7, 8 ** -0.5)
    assert dqkv.shape == (2, 30, 3, 4, 8) and dqkv.is_contiguous()


def _fwd_bwd(q, k, v, idx, n, dout):
    out, lse = fwd_op()(q, k, v, idx, n, q.shape[-1] ** -0.5)
    return out, lse, bwd_op()(dout, q, k, v, out, lse, idx, n, q.shape[-1] ** -0.5)


def test_bitwise_deterministic():
    q, k, v = make_qkv(2, 150, 4, 16, device="cpu", packed=True, requires_grad=False)
    idx = make_index(2, 150, 2, device="cpu")
    dout = torch.randn(q.shape)
    a, b = _fwd_bwd(q, k, v, idx, 49, dout), _fwd_bwd(q, k, v, idx, 49, dout)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_independent_of_thread_count():
    q, k, v = make_qkv(4, 150, 4, 16, device="cpu", packed=True, requires_grad=False)
    idx = make_index(4, 150, 2, device="cpu")
    dout = torch.randn(q.shape)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fwd_bwd(q, k, v, idx, 49, dout)
        torch.set_num_threads(2)
        two = _fwd_bwd(q, k, v, idx, 49, dout)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(one, two):
        assert torch.equal(x, y)


def test_bad_index_stays_in_bounds():
    # Unchecked out-of-range indices give wrong numbers, never an out-of-bounds access:
    # the kernels skip them (rows of skipped tokens are simply not written).
    q, k, v = make_qkv(1, 40, 2, 8, device="cpu", packed=True, requires_grad=False)
    idx = make_index(1, 40, 2, device="cpu")
    idx[0, 0, ::3] = 10 ** 6
    idx[0, 1, ::4] = -7
    out, lse, dqkv = _fwd_bwd(q, k, v, idx, 7, torch.randn(q.shape))
    assert out.shape == q.shape and dqkv.shape == (1, 40, 3, 2, 8)


def test_empty_inputs():
    q = torch.randn(2, 0, 4, 8)
    idx = torch.zeros(2, 2, 0, dtype=torch.int64)
    out, lse = fwd_op()(q, q, q, idx, 7, 0.3)
    assert out.shape == q.shape and lse.shape == (2, 4, 0)


def test_cannot_run_and_auto_choice():
    q = torch.randn(1, 10, 2, 8)
    assert cpp.cannot_run(q, 7) is None
    assert backends.get("cpp").priority["cpu"] > backends.get("reference").priority["cpu"]
    if not cpp.WITH_CUDA:
        meta = torch.empty(1, 10, 2, 8, device="meta")
        assert cpp.cannot_run(meta, 7) is not None


# ---------------------------------------------------------------- CUDA (skipped without a GPU)

GPU_SHAPES = [(2, 98, 4, 16, 2, 49), (1, 100, 4, 32, 1, 49), (2, 37, 4, 32, 4, 7), (1, 300, 2, 128, 2, 256),
              (1, 64, 2, 80, 1, 64), (2, 3136, 4, 16, 2, 49)]


def _cuda_ready():
    return torch.cuda.is_available() and cpp.WITH_CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "B{}L{}H{}D{}G{}N{}".format(*s))
def test_cuda_matches_reference(dtype, shape):
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    batch, length, heads, dim, groups, n = shape
    q, k, v = make_qkv(batch, length, heads, dim, dtype=dtype, device="cuda", packed=True)
    idx = make_index(batch, length, groups, device="cuda", dtype=torch.int32)
    assert_matches_reference(cpp_attention, q, k, v, idx, n)


@pytest.mark.gpu
def test_cuda_matches_triton_and_is_deterministic():
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    q, k, v = make_qkv(2, 3136, 4, 16, dtype=torch.float16, device="cuda", packed=True, requires_grad=False)
    idx = make_index(2, 3136, 2, device="cuda")
    dout = torch.randn(q.shape, device="cuda", dtype=q.dtype)
    a, b = _fwd_bwd(q, k, v, idx, 49, dout), _fwd_bwd(q, k, v, idx, 49, dout)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    if rk.available_backends()["triton"].available:
        tri = backends.get("triton")
        out, lse = tri.forward(q, k, v, idx, 49, 0.25)
        torch.testing.assert_close(a[0], out, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(a[1], lse, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_uses_current_stream_and_opcheck():
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    q, k, v = make_qkv(2, 60, 4, 32, device="cuda", packed=True)
    idx = make_index(2, 60, 2, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = cpp_attention(q, k, v, idx, 7)
    stream.synchronize()
    torch.testing.assert_close(out, rk.reference.window_attention_reference(q, k, v, idx, 7), rtol=1e-4, atol=1e-5)
    torch.library.opcheck(fwd_op(), (q, k, v, idx, 7, 0.2))
    with pytest.raises(ValueError, match="float64"):
        qd = q.detach().double()
        cpp_attention(qd, qd, qd, idx, 7)
