"""What bench_attn.py times: the stage shapes, their random inputs, and the rows (backends of
rsir_kernels and the baselines of docs/design.md section 5) built on those inputs."""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import torch

from rsir_kernels import backends, baselines, ops
from rsir_kernels.models import RSIR_B, RSIR_T
from rsir_kernels.samplers import ir_index, rs_index, window_order

WINDOW = 7
N = WINDOW * WINDOW
GROUPS = 2
BASELINES = ("paper", "torch", "sdpa-windows")


# ---------------------------------------------------------------- shapes and inputs

@dataclasses.dataclass(frozen=True)
class Shape:
    stage: int       # 1-based
    height: int
    width: int
    channels: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def length(self) -> int:
        return self.height * self.width

    def describe(self) -> str:
        return f"{self.height}x{self.width} C{self.channels} H{self.heads} D{self.head_dim}"


def stage_shapes(model: str = "tiny", image: int = 224) -> list[Shape]:
    """The attention shapes of the four stages of RSIR-T ('tiny') or RSIR-B ('base')."""
    config = {"tiny": RSIR_T, "base": RSIR_B}[model]
    shapes = []
    for i, (dim, heads) in enumerate(zip(config.stage_dims(), config.num_heads)):
        side = image // (4 * 2 ** i)
        shapes.append(Shape(i + 1, side, side, dim, heads))
    return shapes


@dataclasses.dataclass
class Inputs:
    shape: Shape
    qkv: torch.Tensor          # (B, L, 3, H, D) leaf, requires_grad
    index: torch.Tensor        # (B, 2, L) int64: RS-Win order, IR-Win order (window order)
    ids_shuffles: list         # the paper's raw ids_shuffle (B, L) for RS and IR
    dout: torch.Tensor         # (B, L, H, D) fixed random output gradient

    @property
    def batch(self) -> int:
        return self.qkv.shape[0]


def make_inputs(shape: Shape, batch: int, device, dtype, seed: int = 0) -> Inputs:
    """Random packed qkv, RS-Win and IR-Win orders built by the samplers on random data."""
    length, heads, dim = shape.length, shape.heads, shape.head_dim
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=gen).to(device, dtype).requires_grad_()
    tokens = torch.randn(batch, length, shape.channels, generator=gen)   # the module's input x
    dout = torch.randn(batch, length, heads, dim, generator=gen).to(device, dtype)
    rs = rs_index(batch, shape.height, shape.width, WINDOW,
                  generator=torch.Generator().manual_seed(seed + 1))           # (B, 1, L)
    ir = ir_index(tokens, shape.height, shape.width, WINDOW)                  # (B, 1, L)
    # The paper's baseline takes the raw ids_shuffle; draw it the way the samplers do and
    # make sure it is the same order.
    rs_raw = torch.rand(batch, 1, length, generator=torch.Generator().manual_seed(seed + 1)).argsort(-1)[:, 0]
    ir_raw = tokens.mean(-1).argsort(dim=-1, stable=True)
    assert torch.equal(window_order(rs_raw, shape.height, shape.width, WINDOW), rs[:, 0])
    assert torch.equal(window_order(ir_raw, shape.height, shape.width, WINDOW), ir[:, 0])
    index = torch.cat([rs, ir], dim=1).to(device)
    return Inputs(shape, qkv, index, [rs_raw.to(device), ir_raw.to(device)], dout)


# ---------------------------------------------------------------- rows: what is timed

@dataclasses.dataclass
class Row:
    """One thing to time: fn(*leaves) -> output; backward with dout; `expected` maps the
    reference's (out, dqkv) to the layout of fn's output and of the leaves' gradients."""
    name: str
    kind: str                       # "backend" or "baseline"
    fn: Callable
    leaves: tuple
    dout: torch.Tensor
    expected: Callable


def backend_row(name: str, inp: Inputs) -> Row:
    index = inp.index

    def fn(qkv):
        q, k, v = qkv.unbind(2)
        return ops.window_attention(q, k, v, index, N, backend=name, check_index=False)
    return Row(name, "backend", fn, (inp.qkv,), inp.dout, lambda out, dqkv: (out, (dqkv,)))


def baseline_rows(inp: Inputs) -> list[Row]:
    s, index, ids = inp.shape, inp.index, inp.ids_shuffles

    def paper(qkv):
        q, k, v = qkv.unbind(2)
        return baselines.paper_rsir_attention(q, k, v, ids, s.height, s.width, WINDOW)

    def torch_path(qkv):
        q, k, v = qkv.unbind(2)
        return baselines.torch_window_attention(q, k, v, index, N)

    # sdpa-windows: windows gathered once, outside the timing, contiguous, as 4-D
    # (B, H * nW, N, D) tensors so that SDPA may pick its fused kernels (those take 4-D only).
    def to_windows(*ts):
        return tuple(w.flatten(1, 2) for w in baselines.gather_windows(*ts, index, N))

    with torch.no_grad():
        windows = tuple(w.detach().clone().requires_grad_() for w in to_windows(*inp.qkv.unbind(2)))
        dout_w = to_windows(inp.dout, inp.dout, inp.dout)[0]

    def sdpa_expected(out, dqkv):
        return to_windows(out, out, out)[0], to_windows(*dqkv.unbind(2))

    same = lambda out, dqkv: (out, (dqkv,))  # noqa: E731
    return [Row("paper", "baseline", paper, (inp.qkv,), inp.dout, same),
            Row("torch", "baseline", torch_path, (inp.qkv,), inp.dout, same),
            Row("sdpa-windows", "baseline", baselines.sdpa_windows, windows, dout_w, sdpa_expected)]


def select_backends(requested: Optional[list[str]], q: torch.Tensor) -> tuple[list[str], dict]:
    """Backends to time on inputs like q (B, L, H, D), and {name: why not} for the others."""
    chosen, skipped = [], {}
    for name in backends.names():
        if requested is not None and name not in requested:
            continue
        b = backends.get(name)
        reason = b.unavailable or b.cannot_run(q, N)
        if reason is None and "triton" in name and q.device.type == "cpu" \
                and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            reason = "TRITON_INTERPRET=1: the interpreter is never benchmarked"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    if requested is not None:
        for name in requested:
            if name not in backends.names():
                skipped[name] = f"no such backend (registered: {', '.join(backends.names())})"
    return chosen, skipped
