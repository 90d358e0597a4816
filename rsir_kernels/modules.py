"""RSIRAttention (Eq. 1 and 2 of the paper) and the RSIR Transformer block (Eq. 3)."""
from __future__ import annotations

import collections
import threading
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn
from torch.fx.experimental.symbolic_shapes import has_static_value  # dynamo reads it too

from . import routing
from .ops import window_attention_qkvpacked
from .samplers import fixed_rs_index, fixed_rs_values, ir_index, rs_index

RS_EVAL_MODES = ("fixed", "random")
FIXED_ORDER_CACHE_SIZE = 8  # eval RS-Win orders kept per module (sizes), least recently used dropped
# Guards every layer's order cache: threads that share a model look up, add and drop sizes at once
# (one lock for the module, not one per layer: a lock in a layer would stop copy.deepcopy of it).
_FIXED_ORDERS_LOCK = threading.Lock()


class RSIRAttention(nn.Module):
    """RS-Win heads and IR-Win heads in parallel, one qkv projection, one output projection.

    Heads 0 .. rs_heads-1 attend in random-sampling windows (RS-Win, Algorithm 1), the
    others in important-region windows (IR-Win, Algorithm 2: tokens sorted by the channel
    mean of this module's input); windows are window_size x window_size tokens.

    In training, RS-Win draws a fresh uniform permutation per image at every forward
    (Algorithm 1). In eval mode, by default (rs_eval="fixed"), it uses one fixed permutation
    per resolution, derived from `seed` (samplers.fixed_rs_index): the same for every image
    of a batch and on every device, so an image's output depends on that image alone, call
    after call. In eager mode the orders are kept per (seed, H, W, device) (not in the state
    dict) in a least-recently-used cache of FIXED_ORDER_CACHE_SIZE entries per module, so that
    the many sizes of detection or multi-scale evaluation hold at most that many orders (8 int64
    tensors of H*W entries per layer; rsir_tiny at 800x1216: 1.6 MiB a size for all layers); a
    hit is a dict look-up, a miss computes the order on the device, neither syncs with the host.
    A graph of torch.compile / torch.export holds them as constants where H and W
    are static, and computes them where they are symbolic (dynamic shapes), equal either way.
    rs_eval="random" keeps fresh draws in eval (the paper's Algorithm 1 has no eval branch).

    Pass a seeded `generator` (on any device) to make the random draws reproducible: two
    modules with equal weights and equally seeded generators give equal outputs, call after
    call. torch.compile cannot trace a draw from an explicit generator (fullgraph=True then
    fails): to compile training, leave `generator=None` and seed torch's global RNG
    (torch._inductor.config.fallback_random = True makes compiled draws equal eager ones).

    Args:
        dim: channels C; num_heads: heads K (C % K == 0).
        rs_heads: RS-Win heads, default K // 2; 0 gives IR-Win only, K RS-Win only.
        attn_drop: must be 0.0 (the fused kernels have no dropout on attention weights;
            RSIR, like Swin, trains without it); proj_drop: dropout after the projection.
        backend: passed to window_attention ("auto", "reference", "triton", "cpp").
        recompute_qkv: keep only this module's input for the backward and recompute the qkv
            projection and the attention forward there (activation checkpointing of both):
            the packed qkv and the log-sum-exp, most of what the module keeps, are not saved,
            for one more projection and attention forward per backward. Gradients are the
            same bits.
        rs_eval: "fixed" (default) or "random": RS-Win's order in eval mode, see above.
        seed: the int the fixed eval order derives from (models give each layer its own).
    Shapes:
        forward(x) with x (B, H, W, C), or forward(x, hw=(H, W)) with x (B, H*W, C);
        returns x's shape. forward(..., rs_order=o) uses o (B or 1, 1, H*W) as the RS-Win
        order instead of drawing one (see rs_order(); activation checkpointing passes the
        order it drew so that the recomputation uses the same windows).
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rs_heads: Optional[int] = None,
                 backend: str = "auto", generator: Optional[torch.Generator] = None,
                 recompute_qkv: bool = False, rs_eval: str = "fixed", seed: int = 0):
        super().__init__()
        if rs_eval not in RS_EVAL_MODES:
            raise ValueError(f"rs_eval must be one of {RS_EVAL_MODES}, got {rs_eval!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        rs_heads = num_heads // 2 if rs_heads is None else rs_heads
        if not 0 <= rs_heads <= num_heads:
            raise ValueError(f"rs_heads must be in 0..{num_heads}, got {rs_heads}")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}")
        if attn_drop != 0.0:
            raise ValueError(f"attn_drop must be 0.0: the fused kernels have no attention dropout, got {attn_drop}")
        self.dim, self.num_heads, self.rs_heads = dim, num_heads, rs_heads
        self.window_size, self.backend, self.generator = window_size, backend, generator
        self.recompute_qkv, self.rs_eval, self.seed = recompute_qkv, rs_eval, seed
        # (seed, H, W, device) -> (1, 1, L), least recently used first; eager mode only
        self._fixed_orders: collections.OrderedDict = collections.OrderedDict()
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, rs_heads={self.rs_heads}, "
                f"window_size={self.window_size}, backend={self.backend!r}"
                + (", recompute_qkv=True" if self.recompute_qkv else "")
                + f", rs_eval={self.rs_eval!r}, seed={self.seed}")

    def rs_order(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """The RS-Win order this forward would use: a fresh draw (batch, 1, L) in training or
        with rs_eval="random", the fixed eval order (1, 1, L) otherwise."""
        if self.training or self.rs_eval == "random":
            return rs_index(batch, height, width, self.window_size, generator=self.generator,
                            device=device)
        if routing.compiling():  # no Python-side cache to guard on
            if has_static_value(height) and has_static_value(width):  # a static size: a constant
                values = fixed_rs_values(int(height), int(width), self.window_size, self.seed)
                return torch.tensor(values, dtype=torch.int64, device=device).view(1, 1, -1)
            return fixed_rs_index(height, width, self.window_size, self.seed, device)  # symbolic: in-graph
        key = (self.seed, height, width, torch.device(device))
        cache = self._fixed_orders
        with _FIXED_ORDERS_LOCK:
            order = cache.get(key)
            if order is not None:
                cache.move_to_end(key)  # the most recently used: last
                return order
        with torch.inference_mode(False):  # a normal tensor: later autograd calls may save it
            order = fixed_rs_index(height, width, self.window_size, self.seed, device)
        with _FIXED_ORDERS_LOCK:  # another thread may have added it meanwhile: the same values
            cache[key] = order
            while len(cache) > FIXED_ORDER_CACHE_SIZE:
                cache.popitem(last=False)
        return order

    def token_order(self, x: torch.Tensor, height: int, width: int,
                    rs_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        """index (B, G, L) for window_attention: G = 1 or 2, or G = K for an uneven split."""
        batch, ir_heads = x.shape[0], self.num_heads - self.rs_heads
        orders, counts = [], []
        if self.rs_heads:
            if rs_order is None:
                rs_order = self.rs_order(batch, height, width, x.device)
            orders.append(rs_order.expand(batch, 1, height * width))
            counts.append(self.rs_heads)
        if ir_heads:
            orders.append(ir_index(x, height, width, self.window_size))
            counts.append(ir_heads)
        if len(set(counts)) > 1:  # uneven split: one order per head
            orders = [o.expand(batch, c, -1) for o, c in zip(orders, counts)]
        return torch.cat(orders, dim=1)

    def forward(self, x: torch.Tensor, hw: Optional[tuple[int, int]] = None,
                rs_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() == 4:
            batch, height, width, channels = x.shape
        elif x.dim() == 3 and hw is not None:
            (batch, _, channels), (height, width) = x.shape, hw
            if x.shape[1] != height * width:
                raise ValueError(f"x has {x.shape[1]} tokens, hw={tuple(hw)} gives {height * width}")
        else:
            raise ValueError(f"x must be (B, H, W, C), or (B, L, C) with hw=(H, W); got shape "
                             f"{tuple(x.shape)} and hw={hw}")
        if channels != self.dim:
            raise ValueError(f"x has {channels} channels, the module expects dim={self.dim}")
        tokens = x.reshape(batch, height * width, channels)
        index = self.token_order(tokens, height, width, rs_order)  # drawn once: a recompute reuses it
        if self.recompute_qkv and routing.grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self._attend, tokens, index, use_reentrant=False)
        else:
            out = self._attend(tokens, index)
        return self.proj_drop(self.proj(out.flatten(2))).reshape(x.shape)

    def _attend(self, tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, L, C) tokens -> (B, L, K, C/K) attention output: the qkv projection and the op."""
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, self.dim // self.num_heads))
        # The samplers build permutations by construction: no index check (it costs a host sync).
        return window_attention_qkvpacked(qkv, index, self.window_size ** 2, backend=self.backend,
                                          check_index=False)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p) if self.p < 1 else x * keep  # p = 1: zeros, as timm's DropPath


class RSIRBlock(nn.Module):
    """X^ = RSIR-Win(LN(X)) + X; X' = MLP(LN(X^)) + X^ (Eq. 3), after a depthwise 3x3
    convolutional position encoding X = X + DWConv(X) (the windows carry no position).

    x: (B, H, W, C) channels-last -> same shape. `backend`, `generator`, `recompute_qkv`,
    `rs_eval` and `seed` go to RSIRAttention, and so does forward's `rs_order`.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path: float = 0.0, rs_heads: Optional[int] = None,
                 backend: str = "auto", generator: Optional[torch.Generator] = None,
                 recompute_qkv: bool = False, rs_eval: str = "fixed", seed: int = 0):
        super().__init__()
        self.cpe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = RSIRAttention(dim, num_heads, window_size, qkv_bias, rs_heads=rs_heads,
                                  backend=backend, generator=generator, recompute_qkv=recompute_qkv,
                                  rs_eval=rs_eval, seed=seed)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rs_order: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.cpe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = x + self.drop_path(self.attn(self.norm1(x), rs_order=rs_order))
        return x + self.drop_path(self.mlp(self.norm2(x)))
