"""Pure-PyTorch ways to compute window attention that the kernels are measured and checked against.

- paper_window_attention: Algorithms 1 and 2 of the paper written out literally (gather by
  ids_shuffle, Swin window_partition, attention, window_reverse, gather by ids_restore):
  the oracle the reference is tested against, and the `paper` benchmark baseline.
- torch_window_attention: the best pure-PyTorch path (advanced-indexing gather,
  scaled_dot_product_attention on the windows, scatter), the `torch` benchmark baseline.
- sdpa_windows: SDPA alone on already-gathered contiguous windows: the attention with no
  gather and no scatter, the floor a fused kernel approaches (`sdpa-windows`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Swin: (B, H, W, C) -> (B * nW, window * window, C), windows row-major."""
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window, window, width // window, window, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)


def window_reverse(windows: torch.Tensor, window: int, height: int, width: int) -> torch.Tensor:
    """Swin: (B * nW, window, window, C) -> (B, H, W, C)."""
    batch = windows.shape[0] // ((height // window) * (width // window))
    x = windows.view(batch, height // window, width // window, window, window, -1)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, -1)


def paper_window_attention(q, k, v, ids_shuffle, height, width, window, scale=None):
    """Algorithm 1/2 for the heads of one group: q, k, v (B, L, h, D), ids_shuffle (B, L).

    height and width must be divisible by window (Swin's window_partition). Returns
    (B, L, h, D).
    """
    batch, length, heads, dim = q.shape
    channels = heads * dim
    scale = dim ** -0.5 if scale is None else scale
    ids_restore = torch.argsort(ids_shuffle, dim=1)

    def to_windows(x):
        x_shuffle = torch.gather(x.reshape(batch, length, channels), dim=1,
                                 index=ids_shuffle.unsqueeze(-1).repeat(1, 1, channels))
        x_windows = window_partition(x_shuffle.view(batch, height, width, channels), window)
        return x_windows.view(-1, window * window, heads, dim).transpose(1, 2)  # (B*nW, h, N, D)

    qw, kw, vw = map(to_windows, (q, k, v))
    attn = ((qw @ kw.transpose(-2, -1)) * scale).softmax(dim=-1)
    attn_windows = (attn @ vw).transpose(1, 2).reshape(-1, window, window, channels)
    x = window_reverse(attn_windows, window, height, width).view(batch, length, channels)
    x_restore = torch.gather(x, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, channels))
    return x_restore.view(batch, length, heads, dim)


def paper_rsir_attention(q, k, v, ids_shuffles, height, width, window, scale=None):
    """Eq. 1: heads split evenly over len(ids_shuffles) groups, group g ordered by
    ids_shuffles[g] (B, L) (RS-Win then IR-Win), outputs concatenated over heads."""
    groups = len(ids_shuffles)
    chunks = zip(*(t.chunk(groups, dim=2) for t in (q, k, v)))
    return torch.cat([paper_window_attention(qg, kg, vg, ids, height, width, window, scale)
                      for (qg, kg, vg), ids in zip(chunks, ids_shuffles)], dim=2)


def torch_window_attention(q, k, v, index, window_size, scale=None):
    """Advanced-indexing gather, SDPA on windows, scatter: q, k, v (B, L, H, D), index (B, G, L)."""
    batch, length, heads, dim = q.shape
    groups = index.shape[1]
    idx = index.repeat_interleave(heads // groups, dim=1)                  # (B, H, L)
    b = torch.arange(batch, device=q.device)[:, None, None]
    h = torch.arange(heads, device=q.device)[None, :, None]
    qs, ks, vs = (t[b, idx, h] for t in (q, k, v))                         # (B, H, L, D)
    full = length - length % window_size
    outs = []
    if full:  # 4-D (B, H * nW, N, D): SDPA's fused CPU/CUDA kernels take 4-D inputs only
        windows = (t[:, :, :full].reshape(batch, heads * (full // window_size), window_size, dim)
                   for t in (qs, ks, vs))
        outs.append(F.scaled_dot_product_attention(*windows, scale=scale).view(batch, heads, full, dim))
    if full < length:
        outs.append(F.scaled_dot_product_attention(qs[:, :, full:], ks[:, :, full:], vs[:, :, full:], scale=scale))
    out_s = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    out = q.new_empty(q.shape)
    out[b, idx, h] = out_s
    return out


def gather_windows(q, k, v, index, window_size):
    """The windows sdpa_windows attends over: (B, H, nW, N, D) each, contiguous (full windows only)."""
    batch, length, heads, dim = q.shape
    idx = index.repeat_interleave(heads // index.shape[1], dim=1)
    full = length - length % window_size
    b = torch.arange(batch, device=q.device)[:, None, None]
    h = torch.arange(heads, device=q.device)[None, :, None]
    return tuple(t[b, idx[:, :, :full], h].unflatten(2, (-1, window_size)).contiguous() for t in (q, k, v))


def sdpa_windows(qw, kw, vw, scale=None):
    """SDPA on windows that are already gathered and contiguous: pass them 4-D,
    (B, H * nW, N, D) (gather_windows(...)[i].flatten(1, 2)), as SDPA's fused kernels need."""
    return F.scaled_dot_product_attention(qw, kw, vw, scale=scale)
