"""rs_index / ir_index / window_order against the paper's gather + window_partition."""
import pytest
import torch

from rsir_kernels import baselines, ir_index, rs_index, window_order
from rsir_kernels.samplers import fixed_rs_index, fixed_rs_values, layer_seed


@pytest.mark.parametrize("height,width,window", [(14, 14, 7), (14, 21, 7), (8, 12, 4)])
def test_window_order_composes_gather_and_window_partition(height, width, window):
    batch, channels = 3, 5
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, height * width, channels, generator=gen)
    ids_shuffle = torch.argsort(torch.rand(batch, height * width, generator=gen), dim=1)
    # the paper: gather by ids_shuffle, lay out as (H, W), Swin window_partition
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).repeat(1, 1, channels))
    paper_windows = baselines.window_partition(shuffled.view(batch, height, width, channels), window)
    # ours: consecutive runs of window*window entries of window_order(ids_shuffle)
    order = window_order(ids_shuffle, height, width, window)
    ours = torch.gather(x, 1, order.unsqueeze(-1).repeat(1, 1, channels)).view(-1, window * window, channels)
    assert torch.equal(ours, paper_windows)


def test_window_order_without_square_tiling_keeps_the_order():
    ids = torch.randperm(10 * 9)[None]
    assert torch.equal(window_order(ids, 10, 9, 7), ids)


def test_window_order_rejects_bad_sizes():
    with pytest.raises(ValueError, match="height\\*width"):
        window_order(torch.arange(10)[None], 3, 3, 1)
    with pytest.raises(ValueError, match="window"):
        window_order(torch.arange(9)[None], 3, 3, 0)


def _is_permutation(rows):
    return torch.equal(rows.sort(dim=-1).values, torch.arange(rows.shape[-1]).expand_as(rows))


def test_rs_index_is_a_reproducible_permutation_per_row():
    a = rs_index(4, 14, 14, 7, groups=3, generator=torch.Generator().manual_seed(5))
    b = rs_index(4, 14, 14, 7, groups=3, generator=torch.Generator().manual_seed(5))
    c = rs_index(4, 14, 14, 7, groups=3, generator=torch.Generator().manual_seed(6))
    assert a.shape == (4, 3, 196) and a.dtype == torch.int64
    assert _is_permutation(a)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0, 0], a[1, 0]) and not torch.equal(a[0, 0], a[0, 1])  # fresh per image and group


def test_rs_index_follows_algorithm_1():
    """argsort of the generator's uniform noise, then the window layout."""
    gen = torch.Generator().manual_seed(7)
    expected = window_order(torch.argsort(torch.rand(2, 1, 196, generator=gen), dim=-1), 14, 14, 7)
    assert torch.equal(rs_index(2, 14, 14, 7, generator=torch.Generator().manual_seed(7)), expected)


def test_rs_index_is_uniform():
    """Each token lands in each position about equally often (chi-square-like bound)."""
    draws = rs_index(4000, 1, 4, 1, generator=torch.Generator().manual_seed(0))[:, 0]
    counts = torch.stack([(draws == t).sum(0) for t in range(4)]).float()  # token x position
    assert (counts - 1000).abs().max() < 150


def test_ir_index_sorts_by_channel_mean_without_gradient():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 196, 16, generator=gen, requires_grad=True)
    index = ir_index(x, 14, 14, 7)
    assert index.shape == (2, 1, 196) and not index.requires_grad
    assert _is_permutation(index)
    expected = window_order(torch.argsort(x.detach().mean(dim=2), dim=1), 14, 14, 7)
    assert torch.equal(index[:, 0], expected)
    # runs of the un-windowed order are sorted by score
    flat = ir_index(x, 14, 14, 14 * 14 + 1)[:, 0]  # no square tiling: the plain argsort
    scores = torch.gather(x.detach().mean(2), 1, flat)
    assert (scores[:, 1:] >= scores[:, :-1]).all()
    # (B, H, W, C) input gives the same order
    assert torch.equal(ir_index(x.detach().view(2, 14, 14, 16), 14, 14, 7), index)


def _python_mix32(h):
    """The fixed order's hash written with Python's unbounded ints, modulo 2^32 at each step."""
    m = 2 ** 32
    h ^= h >> 16
    h = h * 0x7FEB352D % m
    h ^= h >> 15
    h = h * 0x2C1B3C6D % m
    return h ^ (h >> 16)


@pytest.mark.parametrize("height,width,window,seed", [(14, 14, 7, 0), (6, 9, 3, 123456789), (7, 7, 7, 2 ** 31 + 5)])
def test_fixed_rs_index_is_the_hash_order_computed_independently(height, width, window, seed):
    """torch's int64 arithmetic (no overflow) against Python ints, then sorted() and window_order."""
    length = height * width
    offset = _python_mix32(seed % 2 ** 32)
    keys = [_python_mix32((p + offset) % 2 ** 32) for p in range(length)]
    assert len(set(keys)) == length  # a bijection: no ties, one order on every device
    expected = window_order(torch.tensor(sorted(range(length), key=keys.__getitem__)), height, width, window)
    index = fixed_rs_index(height, width, window, seed)
    assert index.shape == (1, 1, length) and index.dtype == torch.int64
    assert torch.equal(index[0, 0], expected) and _is_permutation(index)
    assert torch.equal(fixed_rs_index(height, width, window, seed), index)


@pytest.mark.parametrize("height,width,window,seed", [(8, 8, 7, 0), (14, 21, 7, 5), (8, 12, 4, 2 ** 40 + 3),
                                                     (56, 56, 7, 123), (1, 1, 7, 9)])
def test_fixed_rs_values_are_fixed_rs_index_in_python_ints(height, width, window, seed):
    """The plain-Python order that traced graphs hold as a constant is fixed_rs_index's."""
    values = fixed_rs_values(height, width, window, seed)
    assert all(type(v) is int for v in values)
    assert torch.equal(torch.tensor(values), fixed_rs_index(height, width, window, seed).flatten())


def test_fixed_orders_differ_by_seed_and_layer_seeds_are_distinct():
    assert not torch.equal(fixed_rs_index(14, 14, 7, 0), fixed_rs_index(14, 14, 7, 1))
    seeds = [layer_seed(model_seed, p) for model_seed in (0, 1) for p in range(64)]
    assert len(set(seeds)) == len(seeds)
    with pytest.raises(TypeError, match="seed"):
        fixed_rs_index(14, 14, 7, 0.5)


def test_rs_index_traces_with_symbolic_sizes():
    """torch.rand(..., generator=None) must take symbolic sizes under
    torch.compile(dynamic=True). Three sizes, one compiled function, each row a permutation
    drawn as eager draws it (aot_eager runs the same random op on the same global RNG)."""
    def draw(x):
        return rs_index(x.shape[0], x.shape[1], x.shape[2], 3, device=x.device)

    compiled = torch.compile(draw, backend="aot_eager", fullgraph=True, dynamic=True)
    for height, width in [(6, 9), (7, 7), (5, 8)]:
        x = torch.empty(2, height, width)
        torch.manual_seed(3)
        expected = draw(x)
        torch.manual_seed(3)
        got = compiled(x)
        assert torch.equal(got, expected) and _is_permutation(got)
