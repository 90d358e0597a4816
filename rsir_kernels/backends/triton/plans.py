"""Launch plans: everything a launch needs besides the tensors, computed once per key.

The plan depends only on sizes, strides, dtypes, the window and the scale (every integer and
float argument is `do_not_specialize`: kernels.py), so a call only looks it up; on CUDA it
also keeps the compiled kernel for launch.py's direct launch (`runners`).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import torch

from .config import INTERPRET, Config, cdiv, make_config
from .kernels import window_attn_bwd_kernel, window_attn_fwd_kernel


def _dot_precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # fp32: no tf32, for the 1e-5 tolerance


def _row_align(*strides) -> int:
    """Largest power of two <= 16 dividing every stride but the last (which must be 1) of the
    row tensors' strides: the kernels' alignment hint (kernels.py, ALIGN); ALIGN > 1 also tells
    them that the head-dim stride is 1."""
    align = 16
    for st in strides:
        if st[-1] != 1:
            return 1
        for x in st[:-1]:
            align = math.gcd(align, x)
    return align


@dataclasses.dataclass
class Plan:
    grid: tuple
    args: tuple          # the non-tensor arguments after the tensors, in kernel signature order
    constexprs: dict     # constexpr and compile-option keyword arguments of kernel[grid]
    direct_tail: tuple   # args + the constexpr values in signature order: what compiled[grid] takes
    runners: dict = dataclasses.field(default_factory=dict)  # tensors' (dtype, aligned) -> compiled[grid]


def _make_plan(kernel, grid, args, constexprs) -> Plan:
    names = kernel.arg_names if hasattr(kernel, "arg_names") else []
    tail = tuple(args) + tuple(constexprs[n] for n in names if n in constexprs)
    return Plan(grid=grid, args=tuple(args), constexprs=constexprs, direct_tail=tail)


def _constexprs(cfg: Config, dim: int, dtype, align: int) -> dict:
    """The compile-time arguments both kernels take, from the config."""
    return dict(
        D=dim, HPP=cfg.heads_per_program, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d, SINGLE=cfg.single, PACKED=cfg.windows_per_program > 1,
        DOT_PREC=_dot_precision(dtype), BF16_FIX=INTERPRET and dtype == torch.bfloat16,
        ALIGN=align, NUM_TILES=cdiv(cfg.seg, cfg.block_m),
        WPP=cfg.windows_per_program, NB=cfg.block_m // cfg.windows_per_program,
        num_warps=cfg.num_warps, num_stages=1 if cfg.single else 2)


@functools.lru_cache(maxsize=4096)
def forward_plan(shape, q_st, k_st, v_st, idx_shape, idx_st, out_st, lse_st, dtype, device, window_size, scale,
                 config) -> tuple[Plan, Config]:
    batch, length, heads, dim = shape
    groups = idx_shape[1]
    cfg = config or make_config(batch, length, heads, groups, dim, window_size, dtype, device)
    num_seg = cdiv(length, cfg.seg)
    num_chunks = heads // groups // cfg.heads_per_program
    num_mtiles = 1 if cfg.single else cdiv(cfg.seg, cfg.block_m)
    num_work = num_mtiles * num_seg * num_chunks * groups * batch
    args = (*q_st, *k_st, *v_st, *idx_st, *out_st, *lse_st,
            length, groups, heads // groups, cfg.window, cfg.seg, num_seg, num_mtiles, num_chunks, num_work,
            float(scale) * math.log2(math.e))
    constexprs = _constexprs(cfg, dim, dtype, _row_align(q_st, k_st, v_st, out_st))
    return _make_plan(window_attn_fwd_kernel, (num_work,), args, constexprs), cfg


@functools.lru_cache(maxsize=4096)
def backward_plan(shape, do_st, q_st, k_st, v_st, idx_shape, idx_st, dqkv_st, dtype, device, window_size, scale,
                  config) -> tuple[Plan, Config]:
    batch, length, heads, dim = shape
    groups = idx_shape[1]
    cfg = config or make_config(batch, length, heads, groups, dim, window_size, dtype, device)
    num_seg = cdiv(length, cfg.seg)
    num_chunks = heads // groups // cfg.heads_per_program
    num_work = num_seg * num_chunks * groups * batch
    args = (*do_st, *q_st, *k_st, *v_st, *idx_st, *dqkv_st,
            length, groups, heads // groups, cfg.window, cfg.seg, num_seg, num_chunks, num_work,
            float(scale) * math.log2(math.e), float(scale))
    constexprs = _constexprs(cfg, dim, dtype, _row_align(do_st, q_st, k_st, v_st, dqkv_st))
    return _make_plan(window_attn_bwd_kernel, (num_work,), args, constexprs), cfg
