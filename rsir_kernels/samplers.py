"""Token orders for RS-Win and IR-Win (docs/design.md section 2).

Each returns `index` for window_attention: (B, G, L) int64, every row a permutation of
0..L-1 whose consecutive runs of window*window entries are the windows of Algorithms 1
and 2 of the paper (argsort, then Swin's window_partition of the shuffled sequence laid
out as (height, width)).
"""
from __future__ import annotations

from typing import Optional

import torch


def window_order(ids_shuffle: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """Reorders ids_shuffle (..., L) so that runs of window*window entries are the paper's windows.

    The paper lays the shuffled sequence out as (height, width) and cuts it into
    window x window squares (Swin's window_partition, row-major over squares). When height
    or width is not divisible by window, there is no such square tiling: ids_shuffle is
    returned as it is, and window_attention cuts plain runs of window*window entries (the
    last one partial).
    """
    if ids_shuffle.shape[-1] != height * width:
        raise ValueError(f"ids_shuffle's last dim must be height*width = {height * width}, "
                         f"got {ids_shuffle.shape[-1]}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if height % window or width % window:
        return ids_shuffle
    squares = torch.arange(height * width, device=ids_shuffle.device).view(
        height // window, window, width // window, window).permute(0, 2, 1, 3).reshape(-1)
    return ids_shuffle[..., squares]


def rs_index(batch: int, height: int, width: int, window: int, *, groups: int = 1,
             generator: Optional[torch.Generator] = None,
             device: Optional[torch.device] = None) -> torch.Tensor:
    """RS-Win order: a uniform random permutation per image and group -> (batch, groups, L).

    Algorithm 1: argsort of uniform noise. With `generator` the draw is reproducible; the
    noise is drawn on the generator's device and moved to `device` (default: the generator's).
    """
    if generator is None:  # no generator keyword at all: torch.rand(..., generator=None) rejects
        # symbolic sizes under torch.compile with dynamic shapes
        noise = torch.rand(batch, groups, height * width, device=device)
    else:
        noise = torch.rand(batch, groups, height * width, generator=generator, device=generator.device)
    ids_shuffle = noise.argsort(dim=-1)
    return window_order(ids_shuffle, height, width, window).to(device or noise.device)


_MASK32 = 0xFFFFFFFF


def _mix32(h):
    """A bijection of [0, 2^32) that scrambles bits (a xorshift-multiply finaliser), on a Python
    int or an int64 tensor alike. The multipliers are odd and below 2^31, so products stay
    below 2^63: no int64 overflow on any device or compiler, hence equal results everywhere."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x2C1B3C6D) & _MASK32
    return h ^ (h >> 16)


def layer_seed(model_seed: int, position: int) -> int:
    """A distinct 32-bit seed for the layer at `position` of a model seeded with `model_seed`."""
    return _mix32((_mix32(model_seed & _MASK32) + position) & _MASK32)


def fixed_rs_index(height: int, width: int, window: int, seed: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
    """A fixed RS-Win order for eval: one pseudo-random permutation per (seed, height, width),
    laid out as window_order lays out a draw -> (1, 1, L) int64.

    The permutation is argsort of an integer hash of (seed, token position): the keys are
    distinct (the hash is a bijection) and computed exactly, so the order is the same on every
    device, in eager mode, under torch.compile (dynamic shapes included) and torch.export,
    with no random-number generator involved.
    """
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    position = torch.arange(height * width, device=device, dtype=torch.int64)
    keys = _mix32((position + _mix32(seed & _MASK32)) & _MASK32)
    return window_order(keys.argsort(dim=-1), height, width, window)[None, None]


@torch.compiler.assume_constant_result
def fixed_rs_values(height: int, width: int, window: int, seed: int) -> tuple:
    """fixed_rs_index(height, width, window, seed) as a tuple of Python ints, computed in plain
    Python: torch.compile and torch.export call it once, at trace time, and keep the result, so
    that a graph for a static height and width holds the order as a constant."""
    salt = _mix32(seed & _MASK32)
    keys = [_mix32((p + salt) & _MASK32) for p in range(height * width)]
    order = sorted(range(height * width), key=keys.__getitem__)  # distinct keys: argsort's order
    if height % window or width % window:
        return tuple(order)
    return tuple(order[(r * window + i) * width + c * window + j]  # window_order's squares
                 for r in range(height // window) for c in range(width // window)
                 for i in range(window) for j in range(window))


def ir_index(x: torch.Tensor, height: int, width: int, window: int) -> torch.Tensor:
    """IR-Win order: tokens sorted by their channel mean -> (B, 1, L), no gradient.

    Algorithm 2: argsort(x.mean(dim=-1)) of the attention module's input x, (B, L, C)
    or (B, height, width, C).
    """
    with torch.no_grad():
        score = x.reshape(x.shape[0], height * width, x.shape[-1]).mean(dim=-1)
        ids_shuffle = score.argsort(dim=-1, stable=True)  # ties broken by position: reproducible
    return window_order(ids_shuffle, height, width, window)[:, None]
