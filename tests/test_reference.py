"""The reference against the paper's Algorithms 1 and 2, written out literally (float64)."""
import pytest
import torch

from rsir_kernels import baselines, reference, window_order

from util import make_index


def _paper_inputs(batch=2, height=14, width=21, heads=4, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, height * width, heads, dim, generator=gen, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    x = torch.randn(batch, height * width, heads * dim, generator=gen, dtype=torch.float64)
    rs = torch.argsort(torch.rand(batch, height * width, generator=gen), dim=1)  # Algorithm 1
    ir = torch.argsort(x.mean(dim=2), dim=1)                                      # Algorithm 2
    return q, k, v, rs, ir


def _grads(out, inputs, seed=3):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("orders", ["rs", "ir", "rsir"])
def test_reference_equals_paper_algorithms(orders):
    height, width, window = 14, 21, 7
    q, k, v, rs, ir = _paper_inputs(height=height, width=width)
    ids = {"rs": [rs], "ir": [ir], "rsir": [rs, ir]}[orders]
    paper = baselines.paper_rsir_attention(q, k, v, ids, height, width, window)
    index = torch.stack([window_order(i, height, width, window) for i in ids], dim=1)
    ours = reference.window_attention_reference(q, k, v, index, window * window)
    assert (ours - paper).abs().max() < 1e-10
    for g_ours, g_paper in zip(_grads(ours, (q, k, v)), _grads(paper, (q, k, v))):
        assert (g_ours - g_paper).abs().max() < 1e-10


def test_windows_are_independent_softmaxes():
    """Brute force, one query row at a time: the primitive's definition in docs/design.md section 1."""
    batch, length, heads, dim, groups, n = 2, 23, 4, 5, 2, 6  # last window partial (23 = 3*6 + 5)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, heads, dim, generator=gen, dtype=torch.float64) for _ in range(3))
    index = make_index(batch, length, groups, device="cpu")
    out = reference.window_attention_reference(q, k, v, index, n, scale=0.7)
    for b in range(batch):
        for h in range(heads):
            order = index[b, h // (heads // groups)]
            for start in range(0, length, n):
                win = order[start:start + n]
                p = torch.softmax(q[b, win, h] @ k[b, win, h].T * 0.7, dim=-1)
                assert torch.allclose(out[b, win, h], p @ v[b, win, h], atol=1e-12, rtol=0)


@pytest.mark.parametrize("length,n,groups", [(49 * 2, 49, 2), (49 * 2 + 5, 49, 1), (30, 7, 4), (9, 16, 2)])
def test_analytic_backward_equals_autograd(length, n, groups):
    """The reference backend's backward op against autograd through the reference."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, length, 4, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    index = make_index(2, length, groups, device="cpu")
    out, lse = reference.window_attention_with_lse(q, k, v, index, n, 0.4)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(out, (q, k, v), dout)
    dqkv = reference.window_attention_backward(dout, q, k, v, index, n, 0.4)
    for a, e in zip(dqkv.unbind(2), expected):
        assert (a - e).abs().max() < 1e-12


def test_lse_is_the_row_log_sum_exp():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 12, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    index = make_index(1, 12, 1, device="cpu")
    _, lse = reference.window_attention_with_lse(q, k, v, index, 5, 0.5)
    order = index[0, 0]
    for start in range(0, 12, 5):
        win = order[start:start + 5]
        for h in range(2):
            expected = torch.logsumexp(q[0, win, h] @ k[0, win, h].T * 0.5, dim=-1)
            assert torch.allclose(lse[0, h, win], expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upcast_switch(dtype):
    """fp16/bf16: upcast (default) computes in fp32, upcast=False in the input precision;
    both return the input dtype, and the upcast result is the closer to float64."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 98, 4, 16, generator=gen) for _ in range(3))
    index = make_index(2, 98, 2, device="cpu")
    up = reference.window_attention_reference(*(t.to(dtype) for t in (q, k, v)), index, 49)
    same = reference.window_attention_reference(*(t.to(dtype) for t in (q, k, v)), index, 49, upcast=False)
    assert up.dtype == same.dtype == dtype
    # inputs rounded to dtype are exact in float64: compare against those
    exact = reference.window_attention_reference(*(t.to(dtype).double() for t in (q, k, v)), index, 49)
    assert (up.double() - exact).abs().max() <= (same.double() - exact).abs().max()


# ---------------------------------------------------------------- an unchecked index that is not a permutation

def _broken_index(length=11, n=4):
    """(1, 2, L): group 0 a permutation; in group 1 token 3 is replaced by a second token 5
    placed in another window (so token 3 is in no window, token 5 in two)."""
    index = make_index(1, length, 2, device="cpu", seed=6)
    row = index[0, 1]
    pos3, pos5 = int((row == 3).nonzero()), int((row == 5).nonzero())
    if pos3 // n == pos5 // n:  # same window: move token 3 to a slot of another window first
        other = (pos5 // n + 1) * n % length
        row[[pos3, other]] = row[[other, pos3]]
        pos3 = other
    row[pos3] = 5
    return index, n


def _window_rows(q, k, v, dout, win, h, scale):
    """Brute force, one window: out rows and the three gradients of its tokens (float64)."""
    qw, kw, vw = (t[0, win, h].detach().clone().requires_grad_() for t in (q, k, v))
    ow = torch.softmax(qw @ kw.T * scale, -1) @ vw
    return (ow.detach(), *torch.autograd.grad(ow, (qw, kw, vw), dout[0, win, h]))


def test_unchecked_non_permutation_index_contract():
    """The shared contract for check_index=False (window_attention's docstring), on the
    reference maths and the reference backend: (a) a token in no window of a group gets
    out = 0 and dq = dk = dv = 0 for that group's heads; (c) a token in two windows gets the
    out row and gradient rows of one of them."""
    import rsir_kernels as rk
    index, n = _broken_index()
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 11, 4, 3, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    dout = torch.randn(1, 11, 4, 3, generator=gen, dtype=torch.float64)
    scale = 0.7
    out = rk.window_attention(q, k, v, index, n, scale=scale, backend="reference", check_index=False)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    maths = reference.window_attention_reference(q, k, v, index, n, scale)
    assert torch.equal(out, maths)
    group1 = [2, 3]  # heads of group 1 (H = 4, G = 2)
    for t in (out, *grads):
        assert torch.all(t[0, 3, group1] == 0)
        assert torch.all(t[0, 3, :2] != 0)  # group 0 visits token 3
    row = index[0, 1]
    windows = [row[s:s + n] for s in range(0, 11, n) if 5 in row[s:s + n]]
    assert len(windows) == 2
    for h in group1:
        got = [t[0, 5, h] for t in (out, *grads)]
        candidates = []
        for win in windows:
            at = int((win == 5).nonzero())
            candidates.append([r[at] for r in _window_rows(q, k, v, dout, win, h, scale)])
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            assert any(torch.allclose(got[i], c[i], atol=1e-12, rtol=0) for c in candidates), name


def test_unchecked_index_out_of_range_raises_in_the_reference():
    """(b) an entry outside 0..L-1: the reference raises torch.gather's error (cpp and triton
    treat it as an absent slot instead)."""
    import rsir_kernels as rk
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 9, 2, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    for bad in (9, -1):
        index = make_index(1, 9, 1, device="cpu", seed=10)
        index[0, 0, 4] = bad
        with pytest.raises(RuntimeError, match="out of bounds"):
            reference.window_attention_reference(q, k, v, index, 4)
        with pytest.raises(RuntimeError, match="out of bounds"):
            rk.window_attention(q, k, v, index, 4, backend="reference", check_index=False)


# ---------------------------------------------------------------- fp32 backward at large scores

def _fuzz_packed_inputs(seed, batch, length, heads, groups, dim):
    """q, k, v (B, L, H, D) fp32, index (B, G, L), dout: scripts/fuzz.py's packed layout at
    magnitude 1 for data seed `seed` (the failing fuzz case, drawn again without the script)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(batch, length, 3, heads, dim, generator=gen).unbind(2)
    index = torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(groups)])
                         for _ in range(batch)])
    dout = torch.randn(batch, length, heads, dim, generator=gen)
    return q, k, v, index, dout


@pytest.mark.parametrize("seed,batch,length,heads,groups,dim,window,scale", [
    # P rebuilt as exp(s - lse) from the fp32 lse: dv 2.1e-5 off where autograd is 3.9e-8
    (452, 1, 12, 2, 2, 16, 14, -203.99776485666374),
    # saturated two-token rows: a single-pass delta's rounding cost dq 4.3e-5 (autograd 1.4e-5)
    (279, 2, 2, 3, 3, 1, 5, 191.5930050416728),
])
def test_reference_backward_fp32_at_large_scores(seed, batch, length, heads, groups, dim, window, scale):
    """Fuzz cases reference::452 and ::279 (scores ~1e2-1e3): the reference backend's fp32
    gradients within max(1e-5, 2x) of the fp32 autograd reference's own error, both against
    float64 (the fuzz's rule, tests/test_fuzz.py)."""
    import rsir_kernels as rk
    from util import max_rel_error
    q, k, v, index, dout = _fuzz_packed_inputs(seed, batch, length, heads, groups, dim)

    def grads(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, dout.to(dtype))

    exact = grads(lambda *t: reference.window_attention_reference(*t, index, window, scale), torch.float64)
    autograd32 = grads(lambda *t: reference.window_attention_reference(*t, index, window, scale), torch.float32)
    backend = grads(lambda *t: rk.window_attention(*t, index, window, scale=scale, backend="reference"),
                    torch.float32)
    for name, got, ref, e in zip(("dq", "dk", "dv"), backend, autograd32, exact):
        err, ref_err = max_rel_error(got, e), max_rel_error(ref, e)
        assert err <= max(1e-5, 2 * ref_err), f"{name}: {err:.3g} vs fp32 autograd's {ref_err:.3g}"
