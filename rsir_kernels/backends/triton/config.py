"""Launch configurations of the Triton kernels: the backend's op names, the limits the kernels
run within and how a launch tiles the work (`make_config`, a measured table: no autotuning,
the shapes are few).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional

import torch

NAME, FORWARD_OP, BACKWARD_OP = "triton", "rsir::window_attention_triton", "rsir::window_attention_triton_backward"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128
MAX_WINDOW = 256
MAX_PROGRAMS = 2 ** 31 - 1  # CUDA's grid x limit; program ids are int32
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class Config:
    """How a launch tiles the work (see kernels.py): `seg` index positions per program, in one
    block_m (= block_n) tile when `single`, else walked in block_m x block_n tiles."""
    window: int      # effective window size min(N, L)
    seg: int         # index positions per program: `seg // window` whole windows
    block_m: int
    block_n: int
    block_d: int
    heads_per_program: int
    single: bool
    windows_per_program: int  # > 1: that many windows of 16 slots each, batched 3-D dots
    num_warps: int


# Host-side integer helpers: triton.cdiv / next_power_of_2 are @jit functions whose host
# calls cost microseconds each, a launch's worth of them a visible share of its host time.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _min_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the GPU (a few per SM); 1 under the interpreter."""
    if device.type != "cuda" or INTERPRET:
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)  # pure in its arguments; called for every launch
def make_config(batch: int, length: int, heads: int, groups: int, dim: int, window_size: int,
                dtype: torch.dtype, device: torch.device, tile: Optional[int] = None) -> Config:
    """The launch shape for these sizes; `tile` forces the multi-tile path with that tile (tests)."""
    n = min(window_size, length)
    block_d = max(16, next_pow2(dim))
    # fp32 tiles take twice the registers and its ieee dots run on FMA units: smaller tiles
    max_tile = 8192 if dtype != torch.float32 else 2048
    # tiny windows: several per program (~32 tokens, at most 8 windows), each window in its
    # own 16-slot batch of 3-D dots
    wpp = 1
    if n < 16 and tile is None:
        wpp = min(next_pow2(cdiv(32, n)), next_pow2(cdiv(length, n)),
                  max(1, max_tile // (16 * block_d)), 8)
    block = 16 * wpp if wpp > 1 else max(16, next_pow2(n))
    single = tile is None and block <= 128 and block * block_d <= max_tile
    if not single:
        wpp, block = 1, tile or (64 if dtype != torch.float32 or block_d <= 32 else 32)
    # a tile's registers grow with block * (block + block_d): 2 to 8 warps (no spills on sm_90
    # for bf16 in an offline compile, except a little for head dim 128 backward)
    num_warps = (2 if block_d <= 64 else 4) if block <= 32 else (4 if block <= 64 and block_d <= 64 else 8)
    if dtype == torch.float32:  # fp32 tiles and FMA dots: twice the registers
        num_warps = min(8, 2 * num_warps)
    # heads of one group share the token indices: several per program while the grid stays full
    per_group = heads // groups
    hpp = 1
    if single:
        programs = batch * groups * cdiv(length, wpp * n)
        for cand in range(min(per_group, 8), 0, -1):
            if per_group % cand == 0 and programs * (per_group // cand) >= _min_programs(device):
                hpp = cand
                break
    return Config(window=n, seg=wpp * n, block_m=block, block_n=block, block_d=block_d,
                  heads_per_program=hpp, single=single, windows_per_program=wpp, num_warps=num_warps)


def cannot_run(q: torch.Tensor, window_size: int) -> Optional[str]:
    """Why the Triton kernels can't run these inputs, or None."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 only)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_HEAD_DIM}"
    if min(window_size, q.shape[1]) > MAX_WINDOW:
        return f"window size {window_size} > {MAX_WINDOW}"
    # one flat grid (x only: no 65535 limit of grid y/z); programs <= B * H * windows * query
    # tiles a window (heads per program >= 1), and grid x and program ids stop at 2^31 - 1
    batch, length, heads, _ = q.shape
    n = max(1, min(window_size, length))
    programs = batch * heads * cdiv(length, n) * cdiv(n, 16)
    if programs > MAX_PROGRAMS:
        return f"{programs} programs (B * H * windows * query tiles) > {MAX_PROGRAMS}, the grid's limit"
    if q.device.type == "cpu":
        return None if INTERPRET else "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    if q.device.type != "cuda":
        return f"device type {q.device.type!r} is not supported (CUDA only)"
    return None
