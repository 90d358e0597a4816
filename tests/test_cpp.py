"""Backend `cpp` (the ops library rsir_kernels/librsir_ops.so): forward and the three gradients
against the reference, gradcheck, opcheck, determinism, thread-count independence, bad
indices. CPU here; the CUDA kernels in tests marked gpu (skipped without a GPU).

Outputs are poisoned: RSIR_POISON=1 makes the C++ ops allocate their outputs filled with
NaN, so a row a kernel forgets to write fails the comparison.
"""
import os
import sys
import types

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import backends
from rsir_kernels.backends import cpp

from util import assert_close_to, assert_matches_reference, make_index, make_qkv, max_rel_error

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
    assert cpp.CPU_ISA in ("avx512+amx", "avx512", "avx2+fma", "generic")


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
    q, k, v = q.detach(), k.detach(), v.detach()  # the ops carry no autograd (the Function's job)
    torch.library.opcheck(fwd_op(), (q, k, v, idx, 7, 0.35))
    out, lse = fwd_op()(q, k, v, idx, 7, 0.35)
    torch.library.opcheck(bwd_op(), (torch.randn_like(out), q, k, v, idx, 7, 0.35))


def test_lse_and_output_layout():
    q, k, v = make_qkv(2, 30, 4, 8, device="cpu", packed=True, requires_grad=False)
    idx = make_index(2, 30, 2, device="cpu")
    out, lse = fwd_op()(q, k, v, idx, 7, 8 ** -0.5)
    ref_out, ref_lse = rk.reference.window_attention_with_lse(q, k, v, idx, 7, 8 ** -0.5)
    assert out.is_contiguous() and lse.is_contiguous()
    assert lse.shape == (2, 4, 30) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-6)
    dqkv = bwd_op()(torch.randn_like(out), q, k, v, idx, 7, 8 ** -0.5)
    assert dqkv.shape == (2, 30, 3, 4, 8) and dqkv.is_contiguous()


def _fwd_bwd(q, k, v, idx, n, dout):
    out, lse = fwd_op()(q, k, v, idx, n, q.shape[-1] ** -0.5)
    return out, lse, bwd_op()(dout, q, k, v, idx, n, q.shape[-1] ** -0.5)


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


def _naive_windows(q, k, v, idx, n, scale, dout):
    """Independent float64 loop over the windows of an index that may not be a permutation:
    entries outside 0..L-1 are absent slots. Returns {(b, h, t): [(out, dq, dk, dv), ...]},
    each token's rows from every window slot it fills, in index order (forward and the
    window's own gradients for dout)."""
    batch, length, heads, _ = q.shape
    groups = idx.shape[1]
    rows = {}
    for b in range(batch):
        for g in range(groups):
            for w0 in range(0, length, n):
                toks = [int(t) for t in idx[b, g, w0:w0 + n] if 0 <= int(t) < length]
                if not toks:
                    continue
                for h in range(g * heads // groups, (g + 1) * heads // groups):
                    qw, kw, vw = (x[b, toks, h].double().requires_grad_() for x in (q, k, v))
                    ow = torch.softmax(qw @ kw.T * scale, dim=-1) @ vw
                    gq, gk, gv = torch.autograd.grad(ow, (qw, kw, vw), dout[b, toks, h].double())
                    for i, t in enumerate(toks):
                        rows.setdefault((b, h, t), []).append((ow[i].detach(), gq[i], gk[i], gv[i]))
    return rows


def _run_bad_index(idx, n=5, shape=(2, 20, 4, 8)):
    q, k, v = make_qkv(*shape, device="cpu", packed=True, requires_grad=False, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    scale = shape[-1] ** -0.5
    out, lse = fwd_op()(q, k, v, idx, n, scale)
    dqkv = bwd_op()(dout, q, k, v, idx, n, scale)
    return (out, *dqkv.unbind(2)), _naive_windows(q, k, v, idx, n, scale, dout)


def _bad_index(seed, duplicates):
    idx = make_index(2, 20, 2, device="cpu", seed=seed)
    idx[0, 0, ::3] = 10 ** 6   # absent slots: tokens they replaced are visited by no window of group 0
    idx[1, 1, ::4] = -7
    if duplicates:
        idx[0, 1, 3] = idx[0, 1, 17]  # two windows, and one window twice, hold the same token
        idx[1, 0, 6] = idx[1, 0, 8]
    return idx


@pytest.mark.parametrize("seed", [0, 1])
def test_index_not_a_permutation_contract(seed):
    """check_index=False with absent slots (values outside 0..L-1): every visited token's out
    and gradients are its window's (computed over the present tokens only), and every token no
    window of a group visits gets out = 0 and dq = dk = dv = 0 for that group's heads."""
    got, rows = _run_bad_index(_bad_index(seed, duplicates=False))
    batch, length, heads, _ = got[0].shape
    for b in range(batch):
        for h in range(heads):
            for t in range(length):
                cands = rows.get((b, h, t))
                for name, i, a in zip(("out", "dq", "dk", "dv"), range(4), got):
                    expected = cands[0][i] if cands else torch.zeros(a.shape[-1], dtype=torch.float64)
                    assert len(cands or []) <= 1
                    err = float((a[b, t, h].double() - expected).abs().max())
                    assert err <= 1e-5 * max(1.0, float(expected.abs().max())), f"{name}[{b},{t},{h}]: {err:.3g}"


def test_index_visiting_a_token_twice_gives_its_last_window():
    """A token in more than one window slot gets the out row and gradients of its last slot in
    index order (the CPU ops rerun serially when they see one: deterministic at any thread count)."""
    idx = _bad_index(0, duplicates=True)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            got, rows = _run_bad_index(idx)
            for (b, h, t), cands in rows.items():
                for name, i, a in zip(("out", "dq", "dk", "dv"), range(4), got):
                    expected = cands[-1][i]
                    err = float((a[b, t, h].double() - expected).abs().max())
                    assert err <= 1e-5 * max(1.0, float(expected.abs().max())), f"{name}[{b},{t},{h}]: {err:.3g}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("window_size", [sys.maxsize, 2 ** 62 + 1, 2 ** 40], ids=["int64max", "2^62+1", "2^40"])
def test_any_int64_window_size_is_one_window(window_size):
    """A window longer than L is all of L (one window): no overflow of ceil(L / N) anywhere."""
    q, k, v = make_qkv(2, 30, 4, 8, device="cpu", packed=True, requires_grad=False)
    idx = make_index(2, 30, 2, device="cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
    out, lse = fwd_op()(q, k, v, idx, window_size, 0.3)
    dqkv = bwd_op()(dout, q, k, v, idx, window_size, 0.3)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = rk.reference.window_attention_reference(*leaves, idx, 30, 0.3, upcast=True)
    ref_grads = torch.autograd.grad(ref, leaves, dout.double())
    for name, a, e in zip(("out", "dq", "dk", "dv"), (out, *dqkv.unbind(2)), (ref, *ref_grads)):
        assert_close_to(a, e.detach(), name=name)


def _resident_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    pytest.skip("no VmRSS in /proc/self/status")


def test_scratch_of_a_large_window_is_released():
    """The per-thread scratch is O(N^2) (scores and probabilities): one window of 4096 tokens
    needs 64 MiB forward, 128 MiB backward. It must not stay resident after the call."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs /proc/self/status")
    length = 4096
    q, k, v = make_qkv(1, length, 1, 8, device="cpu", packed=False, requires_grad=False, seed=6)
    idx = make_index(1, length, 1, device="cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    _fwd_bwd(q[:, :64], k[:, :64], v[:, :64], idx[:, :, :64] % 64, 64, dout[:, :64])  # warm up
    before = _resident_mib()
    out, lse, dqkv = _fwd_bwd(q, k, v, idx, length, dout)
    growth = _resident_mib() - before
    expected = rk.reference.window_attention_reference(q.double(), k.double(), v.double(), idx, length)
    assert max_rel_error(out, expected) <= 1e-5
    del out, lse, dqkv
    assert growth < 40, f"resident memory grew by {growth:.0f} MiB after one N = L = {length} call"


def test_cannot_run_names_every_cuda_launch_limit(monkeypatch):
    """The CUDA grid is (windows, heads, batch): heads or batch above 65535 fail at launch, so
    cannot_run must name them and "auto" falls back instead of raising."""
    monkeypatch.setattr(cpp, "WITH_CUDA", True)

    def fake(batch, heads, dtype=torch.float16):
        return types.SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(batch, 49, heads, 32))

    assert cpp.cannot_run(fake(65535, 4), 49) is None
    assert cpp.cannot_run(fake(8, 65535), 49) is None
    assert "batch <= 65535" in cpp.cannot_run(fake(65536, 4), 49)
    assert "heads <= 65535" in cpp.cannot_run(fake(8, 65536), 49)
    assert "head dim" in cpp.cannot_run(types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.float16,
                                                              shape=(1, 49, 2, 256)), 49)


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
    torch.library.opcheck(fwd_op(), (q.detach(), k.detach(), v.detach(), idx, 7, 0.2))  # no autograd on the op
    with pytest.raises(ValueError, match="float64"):
        qd = q.detach().double()
        cpp_attention(qd, qd, qd, idx, 7)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_saturated_softmax_low_precision(dtype):
    """Scale 1 at D = 32 saturates tiny windows' softmax, where dS = P * (dP - delta) cancels:
    the CUDA kernels take delta = rowsum(P * dP) / rowsum(P) in fp32 on chip (not
    FlashAttention's rowsum(dO * O) from the rounded O), so fp16 / bf16 gradients stay within
    2x the same-precision reference (tests/test_robustness.py's case, on the CUDA kernels)."""
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    for length, window, heads in ((2, 3, 1), (4, 2, 2), (20, 3, 2)):
        for seed in range(6):
            q, k, v = make_qkv(1, length, heads, 32, dtype=dtype, device="cuda", seed=seed, packed=bool(seed % 2))
            index = make_index(1, length, 1, device="cuda", seed=seed + 1)
            assert_matches_reference(cpp_attention, q, k, v, index, window, scale=1.0, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("m,scale", [(1.0, None), (100.0, None), (1e3, None), (1e4, None), (1.0, 1e4), (30.0, 30.0)])
def test_cuda_fp32_at_large_scores(m, scale):
    """P recomputed in the backward as the forward rounded the scores (tests/test_magnitudes.py
    on the CUDA kernels)."""
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    from test_magnitudes import check_case
    assert check_case("cpp", m, scale, device="cuda") == []


@pytest.mark.gpu
def test_cuda_index_not_a_permutation_contract(monkeypatch):
    """CUDA: unvisited tokens get out = 0 and zero gradients (zero-filled outputs), absent
    slots are neither read nor written (as the CPU test above)."""
    if not _cuda_ready():
        pytest.skip("the extension was built without CUDA")
    monkeypatch.setenv("RSIR_POISON", "0")  # poisoned outputs would hide the zero fill
    idx = _bad_index(0, duplicates=False)
    q, k, v = make_qkv(2, 20, 4, 8, device="cpu", packed=True, requires_grad=False, seed=3)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    qc, kc, vc, dc, ic = (t.cuda() for t in (q, k, v, dout, idx))
    out, lse = fwd_op()(qc, kc, vc, ic, 5, 8 ** -0.5)
    dqkv = bwd_op()(dc, qc, kc, vc, ic, 5, 8 ** -0.5)
    got = [t.cpu() for t in (out, *dqkv.unbind(2))]
    rows = _naive_windows(q, k, v, idx, 5, 8 ** -0.5, dout)
    for b in range(2):
        for h in range(4):
            for t in range(20):
                cands = rows.get((b, h, t))
                for i, a in enumerate(got):
                    expected = cands[0][i] if cands else torch.zeros(8, dtype=torch.float64)
                    assert float((a[b, t, h].double() - expected).abs().max()) <= 1e-4


# Fuzz case cpp:generic:7604 (scripts/fuzz.py): three tokens, D = 7, scale 64.3. One row's
# softmax saturates at P_max = 1 - 6.2e-4, so dS_max = P_max (dP_max - delta) ~ 1e-3 is a
# difference of two numbers ~2.2: one ulp of delta (2.4e-7) was 2e-4 of dq and dk.
SATURATED_DELTA_CASE = {"batch": 1, "length": 3, "heads": 4, "groups": 4, "dim": 7, "window": 5,
                        "dtype": "float32", "layout": "dim-strided", "index_dtype": "int64",
                        "magnitude": 1.0, "scale": 64.26290761229696, "data_seed": 7604}


def saturated_delta_errors() -> dict:
    """Relative errors of the cpp backend's dq and dk on SATURATED_DELTA_CASE against float64."""
    import importlib.util
    from rsir_kernels import reference
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("rsir_fuzz", os.path.join(root, "scripts", "fuzz.py"))
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    case = SATURATED_DELTA_CASE
    q, k, v, index, dout = fuzz.make_inputs(case, "cpu")

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(fn(*leaves), leaves[:2], dout.to(dtype))

    n, scale = case["window"], case["scale"]
    exact = grads(lambda *t: reference.window_attention_reference(*t, index, n, scale), torch.float64)
    got = grads(lambda *t: cpp_attention(*t, index, n, scale), torch.float32)
    return {name: max_rel_error(a, e) for name, a, e in zip(("dq", "dk"), got, exact)}


@pytest.mark.parametrize("isa", ["avx512", "avx2", "generic"])
def test_saturated_softmax_delta_refined(isa):
    """dS_max = P_max (dP_max - delta) at a saturated row keeps its relative accuracy: the CPU
    core refines delta once (core/softmax_grad.h, grad_cols), so dq and dk of the fuzz case above are
    within fp32's 1e-5 (2e-4 with a single-pass delta), in every ISA build (one process each:
    the core picks its build once per process; a CPU without the ISA runs a lesser one)."""
    import json
    import subprocess
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_cpp; "
            "from rsir_kernels.backends import cpp; "
            "print(json.dumps([cpp.CPU_ISA, test_cpp.saturated_delta_errors()]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, RSIR_CPU_ISA=isa, OMP_NUM_THREADS="1", RSIR_POISON="1")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran, errors = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(err <= 1e-5 for err in errors.values()), (ran, errors)
