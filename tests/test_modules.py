"""RSIRAttention against Eq. 1 and 2 built from the paper's algorithms; eval behaviour; compile."""
import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import baselines
from rsir_kernels.backends import get as get_backend
from rsir_kernels.samplers import fixed_rs_index
from util import max_rel_error


def _paper_module_output(module, x, seed):
    """Eq. 1/2 by hand: the module's projections around Algorithms 1 (RS) and 2 (IR)."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, -1, channels)
    heads = module.num_heads
    q, k, v = module.qkv(tokens).view(batch, -1, 3, heads, channels // heads).unbind(2)
    gen = torch.Generator().manual_seed(seed)
    rs = torch.argsort(torch.rand(batch, 1, height * width, generator=gen), dim=-1)[:, 0]
    ir = torch.argsort(tokens.mean(dim=2), dim=1)
    out = baselines.paper_rsir_attention(q, k, v, [rs, ir], height, width, module.window_size)
    return module.proj(out.reshape(batch, height, width, channels))


def test_rsir_attention_is_eq_1_and_2():
    torch.manual_seed(0)
    module = rk.RSIRAttention(32, 4, window_size=7, generator=torch.Generator().manual_seed(11)).double()
    x = torch.randn(2, 14, 21, 32, dtype=torch.float64)
    assert torch.allclose(module(x), _paper_module_output(module, x, 11), atol=1e-12, rtol=0)


def test_token_layouts_agree():
    module = rk.RSIRAttention(16, 2, window_size=4)
    x = torch.randn(2, 8, 12, 16)
    module.generator = torch.Generator().manual_seed(1)
    grid = module(x)
    module.generator = torch.Generator().manual_seed(1)
    flat = module(x.reshape(2, 96, 16), hw=(8, 12))
    assert flat.shape == (2, 96, 16) and torch.equal(grid.reshape(2, 96, 16), flat)


def test_eval_mode_draws_fresh_windows_reproducibly():
    """rs_eval="random": RS-Win samples in eval as in training; equally seeded generators
    reproduce the draws."""
    torch.manual_seed(0)
    a = rk.RSIRAttention(32, 4, generator=torch.Generator().manual_seed(3), rs_eval="random").eval()
    b = rk.RSIRAttention(32, 4, generator=torch.Generator().manual_seed(3), rs_eval="random").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 14, 14, 32)
    first, second = a(x), a(x)
    assert not torch.equal(first, second)                      # a fresh permutation per call
    assert torch.equal(first, b(x)) and torch.equal(second, b(x))  # the same sequence of draws


def test_ir_only_is_deterministic_and_permutation_equivariant():
    """rs_heads=0: IR-Win only, no randomness; permuting the tokens permutes the output."""
    module = rk.RSIRAttention(16, 2, window_size=3, rs_heads=0).double()
    x = torch.randn(1, 36, 16, dtype=torch.float64)
    out = module(x, hw=(6, 6))
    assert torch.equal(out, module(x, hw=(6, 6)))
    perm = torch.randperm(36)
    # a token permutation changes the (H, W) layout, so compare with plain runs of 9 (no square tiling)
    plain = rk.RSIRAttention(16, 2, window_size=3, rs_heads=0).double()
    plain.load_state_dict(module.state_dict())
    y = plain(x, hw=(4, 9))
    assert torch.allclose(plain(x[:, perm], hw=(4, 9)), y[:, perm], atol=1e-12)


@pytest.mark.parametrize("rs_heads,groups", [(0, 1), (4, 1), (1, 4), (3, 4), (2, 2)])
def test_head_splits(rs_heads, groups):
    module = rk.RSIRAttention(32, 4, rs_heads=rs_heads, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 7, 7, 32)
    index = module.token_order(x.reshape(2, 49, 32), 7, 7)
    assert index.shape == (2, groups, 49)
    if groups == 4:  # uneven split: one order per head, RS heads share one order, IR heads another
        assert torch.equal(index[:, :rs_heads], index[:, :1].expand(2, rs_heads, 49))
        assert torch.equal(index[:, rs_heads:], index[:, 3:].expand(2, 4 - rs_heads, 49))
        assert not torch.equal(index[:, 0], index[:, 3])
    assert module(x).shape == x.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="dim=30 must be divisible by num_heads=4"):
        rk.RSIRAttention(30, 4)
    with pytest.raises(ValueError, match="rs_heads must be in 0..4, got 5"):
        rk.RSIRAttention(32, 4, rs_heads=5)
    with pytest.raises(ValueError, match="attn_drop must be 0.0"):
        rk.RSIRAttention(32, 4, attn_drop=0.1)
    module = rk.RSIRAttention(32, 4)
    with pytest.raises(ValueError, match="hw=\\(H, W\\)"):
        module(torch.randn(2, 49, 32))
    with pytest.raises(ValueError, match="49 tokens, hw=\\(5, 5\\) gives 25"):
        module(torch.randn(2, 49, 32), hw=(5, 5))
    with pytest.raises(ValueError, match="16 channels, the module expects dim=32"):
        module(torch.randn(2, 7, 7, 16))


def test_gradients_reach_every_parameter():
    module = rk.RSIRBlock(32, 4)
    module(torch.randn(2, 14, 14, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_compile_fullgraph_matches_eager():
    import torch._inductor.config as inductor_config
    with inductor_config.patch(fallback_random=True):  # eager's RNG stream in compiled code
        _compile_fullgraph_matches_eager()


def _compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = rk.RSIRAttention(32, 4)
    x = torch.randn(2, 14, 14, 32, requires_grad=True)
    torch.manual_seed(1)
    eager = module(x)
    eager_grad, = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(module, fullgraph=True)
    torch.manual_seed(1)
    out = compiled(x)
    grad, = torch.autograd.grad(out.square().sum(), x)
    assert max_rel_error(out, eager) <= 1e-5
    assert max_rel_error(grad, eager_grad) <= 1e-5


@pytest.mark.parametrize("recompute_qkv", [False, True])
def test_module_saves_only_what_its_backward_needs(recompute_qkv):
    """The bytes autograd keeps for one RSIRAttention: the qkv projection's input and weight,
    the packed qkv and the index (all the attention op keeps), the attention output (kept by the
    output projection, which needs it as its input) and the output projection's weight; with
    recompute_qkv, only the input, the index, the output and the output projection's weight.
    Counted by storage, from the shapes, for every backend."""
    from rsir_kernels import backends
    batch, height, width, channels, heads = 2, 14, 14, 32, 4
    length = height * width
    kept = [batch * length * channels,          # tokens, the qkv projection's input
            batch * length * channels,          # out = the output projection's input
            channels * channels]                # the output projection's weight
    if not recompute_qkv:
        kept += [3 * channels * channels,       # the qkv projection's weight
                 batch * length * 3 * channels]  # qkv
    expected = 4 * sum(kept) + 8 * batch * 2 * length  # + index (B, G=2, L) int64
    x = torch.randn(batch, height, width, channels)
    for name in backends.names():
        b = backends.get(name)
        if b.unavailable or b.cannot_run(x.view(batch, length, heads, -1), 49):
            continue
        module = rk.RSIRAttention(channels, heads, 7, backend=name, recompute_qkv=recompute_qkv)
        assert _saved_bytes(lambda: module(x.requires_grad_())) == expected, name


def _saved_bytes(fn):
    """Bytes autograd keeps for backward while fn() runs (benchmarks.common.measure's count)."""
    from benchmarks.common.measure import saved_bytes
    return saved_bytes(fn)[0]


def test_recompute_qkv_keeps_under_half_of_the_pytorch_path_module():
    """The same module with its attention done by the pure-PyTorch path (gather, SDPA on
    windows, scatter) keeps the gathered q, k, v, their output and the scattered output; the
    fused op alone keeps less, and with recompute_qkv under half of it."""
    x = torch.randn(2, 14, 14, 32, requires_grad=True)
    module = rk.RSIRAttention(32, 4, 7, backend="reference", generator=torch.Generator().manual_seed(1))

    def pytorch_path():
        tokens = x.reshape(2, 196, 32)
        index = module.token_order(tokens, 14, 14)
        q, k, v = module.qkv(tokens).unflatten(-1, (3, 4, 8)).unbind(2)
        return module.proj(baselines.torch_window_attention(q, k, v, index, 49).flatten(2))

    baseline = _saved_bytes(pytorch_path)
    assert _saved_bytes(lambda: module(x)) < baseline
    module.recompute_qkv = True
    assert _saved_bytes(lambda: module(x)) <= baseline / 2


def test_recompute_qkv_gives_the_same_bits():
    """recompute_qkv reruns the projection and the op in the backward with the index drawn in
    the forward: output and every gradient equal those of the plain module."""
    from rsir_kernels import backends
    x = torch.randn(2, 14, 14, 32)
    for name in backends.names():
        b = backends.get(name)
        if b.unavailable or b.cannot_run(x.view(2, 196, 4, -1), 49):
            continue
        results = []
        for recompute in (False, True):
            torch.manual_seed(0)
            module = rk.RSIRAttention(32, 4, 7, backend=name, recompute_qkv=recompute,
                                      generator=torch.Generator().manual_seed(3))
            leaf = x.clone().requires_grad_()
            out = module(leaf)
            out.backward(torch.ones_like(out))
            results.append([out.detach(), leaf.grad] + [p.grad for p in module.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*results)), name


@pytest.mark.parametrize("backend,dtype,rtol", [("reference", torch.float64, 1e-12), ("cpp", torch.float32, 1e-5),
                                                ("triton", torch.float32, 1e-5)])
def test_eval_uses_a_fixed_order_per_image(backend, dtype, rtol):
    """Eval (rs_eval="fixed"): bitwise equal call after call; an image's output is a function of
    that image alone (alone = inside a batch of 4); the order is fixed_rs_index of the seed."""
    if get_backend(backend).unavailable is not None:
        pytest.skip(f"{backend}: {get_backend(backend).unavailable}")
    torch.manual_seed(0)
    module = rk.RSIRAttention(32, 4, 7, backend=backend, seed=17).to(dtype).eval()
    x = torch.randn(4, 14, 14, 32, dtype=dtype)
    batch = module(x)
    assert torch.equal(batch, module(x))
    alone = module(x[:1])
    assert torch.allclose(alone, batch[:1], rtol=rtol, atol=rtol * batch.abs().max().item())
    assert torch.equal(module.rs_order(4, 14, 14, x.device), fixed_rs_index(14, 14, 7, 17))
    # cached per (seed, H, W, device): the same tensor, no sampler work after the first call
    assert module.rs_order(1, 14, 14, x.device) is module.rs_order(4, 14, 14, x.device)
    assert set(module.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}  # not a buffer
    other = rk.RSIRAttention(32, 4, 7, backend=backend, seed=18).to(dtype).eval()
    other.load_state_dict(module.state_dict())
    assert not torch.equal(other(x), batch)  # the seed is configuration: another seed, other windows


def test_rs_eval_is_validated():
    with pytest.raises(ValueError, match="rs_eval"):
        rk.RSIRAttention(32, 4, rs_eval="sometimes")
    with pytest.raises(TypeError, match="seed"):
        rk.RSIRAttention(32, 4, seed="0")


def test_compile_with_dynamic_shapes_across_three_resolutions():
    """A second resolution must not crash the compiled module (torch.rand with generator=None
    and symbolic sizes), and each gives eager's output. Training draws (fallback_random: eager's RNG stream)
    and the fixed eval orders, compiled with automatic dynamic shapes and with dynamic=True."""
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    module = rk.RSIRAttention(32, 4, 3)
    for dynamic, mode in ((None, "train"), (True, "eval")):  # automatic dynamic; then a fixed-order graph
        torch._dynamo.reset()
        compiled = torch.compile(module, fullgraph=True, dynamic=dynamic)
        module.train(mode == "train")
        for height, width in [(6, 9), (7, 7), (5, 8)]:
            x = torch.randn(2, height, width, 32)
            with inductor_config.patch(fallback_random=True):
                torch.manual_seed(1)
                eager = module(x)
                torch.manual_seed(1)
                out = compiled(x)
            assert torch.allclose(out, eager, atol=1e-5, rtol=1e-5), (dynamic, mode, height, width)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_op_compiles_with_dynamic_shapes(backend):
    """The op itself over three token counts (full and partial last windows) in one dynamic
    graph, against eager."""
    if get_backend(backend).unavailable is not None:
        pytest.skip(f"{backend}: {get_backend(backend).unavailable}")
    torch._dynamo.reset()

    def attend(qkv, index):
        return rk.window_attention_qkvpacked(qkv, index, 9, backend=backend, check_index=False)

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for length in (54, 49, 40):
        qkv = torch.randn(2, length, 3, 4, 8, generator=gen)
        index = rk.rs_index(2, 1, length, 3, groups=2, generator=gen)
        assert torch.allclose(compiled(qkv, index), attend(qkv, index), rtol=1e-6, atol=1e-6)


def test_fixed_order_cached_under_inference_mode_serves_a_later_backward():
    """The cache is filled by whichever call comes first (here under inference_mode): a later
    eval call with autograd gives what a module whose cache was filled with grad on gives."""
    torch.manual_seed(0)
    module = rk.RSIRAttention(16, 2, 4, backend="reference").double().eval()
    x = torch.randn(1, 8, 8, 16, dtype=torch.float64)
    with torch.inference_mode():
        expected = module(x)
    fresh = rk.RSIRAttention(16, 2, 4, backend="reference").double().eval()
    fresh.load_state_dict(module.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = module(xa)
    assert torch.equal(out, expected)
    grad, = torch.autograd.grad(out.square().sum(), xa)
    fresh_grad, = torch.autograd.grad(fresh(xb).square().sum(), xb)  # its cache filled with grad on
    assert torch.equal(grad, fresh_grad)
