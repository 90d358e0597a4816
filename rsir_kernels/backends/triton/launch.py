"""Launchers of the Triton kernels and their torch.library ops.

`forward_into` / `backward_into` write into caller-given buffers (tests poison them with NaN
first); `forward` / `backward` allocate (zero-filled outputs) and call them: what a plain eager
call runs (rsir_kernels.ops), through per-shape launch plans and, on CUDA, a direct launch of
the compiled kernels. The ops `rsir::window_attention_triton` and
`rsir::window_attention_triton_backward` are `torch.library.triton_op` on CUDA (Inductor
launches the kernels from its generated code) and `torch.library.custom_op` with
`register_fake` under the interpreter (docs/design.md section 6); `OP_KIND` says which.
Inputs are assumed valid (rsir_kernels.ops checks them); the kernels still mask every load
and store by the token index, so a bad index never touches memory out of bounds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Optional

import torch
import triton

from .. import register_fakes
from . import BACKWARD_OP, FORWARD_OP
from .kernels import window_attn_bwd_kernel, window_attn_fwd_kernel

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
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
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
    block_d = max(16, _next_pow2(dim))
    # fp32 tiles take twice the registers and its ieee dots run on FMA units: smaller tiles
    max_tile = 8192 if dtype != torch.float32 else 2048
    # tiny windows: several per program (~32 tokens, at most 8 windows), each window in its
    # own 16-slot batch of 3-D dots
    wpp = 1
    if n < 16 and tile is None:
        wpp = min(_next_pow2(_cdiv(32, n)), _next_pow2(_cdiv(length, n)),
                  max(1, max_tile // (16 * block_d)), 8)
    block = 16 * wpp if wpp > 1 else max(16, _next_pow2(n))
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
        programs = batch * groups * _cdiv(length, wpp * n)
        for cand in range(min(per_group, 8), 0, -1):
            if per_group % cand == 0 and programs * (per_group // cand) >= _min_programs(device):
                hpp = cand
                break
    return Config(window=n, seg=wpp * n, block_m=block, block_n=block, block_d=block_d,
                  heads_per_program=hpp, single=single, windows_per_program=wpp, num_warps=num_warps)


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


# ---------------------------------------------------------------- launch plans
#
# Everything a launch needs besides the tensors depends only on sizes, strides, dtypes, the
# window and the scale: it is computed once per such key (a plan) and a call only looks it
# up. On CUDA the plan also keeps Triton's compiled kernel after its first ordinary
# `kernel[grid](...)` launch and later calls launch it directly (`compiled[grid](*args)`),
# skipping Triton's per-call argument binding, specialization and cache-key hashing. That
# reuse is valid because nothing a call can change selects another compiled kernel: every
# integer and float argument is `do_not_specialize` (kernels.py) and in the plan's key (with
# the index's token stride, the one specialized integer), and the tensors' dtypes and 16-byte
# pointer alignment, which Triton specializes on, key the plan's stored kernels. Under the
# interpreter, or where a Triton version lacks CompiledKernel.__getitem__, every call takes the
# ordinary path; RSIR_TRITON_DIRECT_LAUNCH=0 forces it everywhere.


@dataclasses.dataclass
class _Plan:
    grid: tuple
    args: tuple          # the non-tensor arguments after the tensors, in kernel signature order
    constexprs: dict     # constexpr and compile-option keyword arguments of kernel[grid]
    direct_tail: tuple   # args + the constexpr values in signature order: what compiled[grid] takes
    runners: dict = dataclasses.field(default_factory=dict)  # tensors' (dtype, aligned) -> compiled[grid]


def _make_plan(kernel, grid, args, constexprs) -> _Plan:
    names = kernel.arg_names if hasattr(kernel, "arg_names") else []
    tail = tuple(args) + tuple(constexprs[n] for n in names if n in constexprs)
    return _Plan(grid=grid, args=tuple(args), constexprs=constexprs, direct_tail=tail)


def _constexprs(cfg: Config, dim: int, dtype, align: int) -> dict:
    """The compile-time arguments both kernels take, from the config."""
    return dict(
        D=dim, HPP=cfg.heads_per_program, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=cfg.block_d, SINGLE=cfg.single, PACKED=cfg.windows_per_program > 1,
        DOT_PREC=_dot_precision(dtype), BF16_FIX=INTERPRET and dtype == torch.bfloat16,
        ALIGN=align, NUM_TILES=_cdiv(cfg.seg, cfg.block_m),
        WPP=cfg.windows_per_program, NB=cfg.block_m // cfg.windows_per_program,
        num_warps=cfg.num_warps, num_stages=1 if cfg.single else 2)


@functools.lru_cache(maxsize=4096)
def _forward_plan(shape, q_st, k_st, v_st, idx_shape, idx_st, out_st, lse_st, dtype, device, window_size, scale,
                  config) -> tuple[_Plan, Config]:
    batch, length, heads, dim = shape
    groups = idx_shape[1]
    cfg = config or make_config(batch, length, heads, groups, dim, window_size, dtype, device)
    num_seg = _cdiv(length, cfg.seg)
    num_chunks = heads // groups // cfg.heads_per_program
    num_mtiles = 1 if cfg.single else _cdiv(cfg.seg, cfg.block_m)
    num_work = num_mtiles * num_seg * num_chunks * groups * batch
    args = (*q_st, *k_st, *v_st, *idx_st, *out_st, *lse_st,
            length, groups, heads // groups, cfg.window, cfg.seg, num_seg, num_mtiles, num_chunks, num_work,
            float(scale) * math.log2(math.e))
    constexprs = _constexprs(cfg, dim, dtype, _row_align(q_st, k_st, v_st, out_st))
    return _make_plan(window_attn_fwd_kernel, (num_work,), args, constexprs), cfg


@functools.lru_cache(maxsize=4096)
def _backward_plan(shape, do_st, q_st, k_st, v_st, idx_shape, idx_st, dqkv_st, dtype, device, window_size, scale,
                   config) -> tuple[_Plan, Config]:
    batch, length, heads, dim = shape
    groups = idx_shape[1]
    cfg = config or make_config(batch, length, heads, groups, dim, window_size, dtype, device)
    num_seg = _cdiv(length, cfg.seg)
    num_chunks = heads // groups // cfg.heads_per_program
    num_work = num_seg * num_chunks * groups * batch
    args = (*do_st, *q_st, *k_st, *v_st, *idx_st, *dqkv_st,
            length, groups, heads // groups, cfg.window, cfg.seg, num_seg, num_chunks, num_work,
            float(scale) * math.log2(math.e), float(scale))
    constexprs = _constexprs(cfg, dim, dtype, _row_align(do_st, q_st, k_st, v_st, dqkv_st))
    return _make_plan(window_attn_bwd_kernel, (num_work,), args, constexprs), cfg


def _launch(kernel, plan: _Plan, tensors) -> None:
    """One launch of `kernel` on `tensors` (its pointer arguments, in order) with `plan`."""
    device = tensors[0].device
    if device.type != "cuda":  # the interpreter
        kernel[plan.grid](*tensors, *plan.args, **plan.constexprs)
        return
    aligned = tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)
    guard = device.index != torch.cuda.current_device()
    with torch.cuda.device(device) if guard else contextlib.nullcontext():
        runner = plan.runners.get(aligned)
        if runner is not None:
            runner(*tensors, *plan.direct_tail)
            return
        compiled = kernel[plan.grid](*tensors, *plan.args, **plan.constexprs)
        if DIRECT_LAUNCH and hasattr(compiled, "__getitem__") and hasattr(compiled, "function"):
            plan.runners[aligned] = compiled[plan.grid]


# The Triton versions whose launch hands the compiled kernel every bound argument, constexprs
# included, in signature order (JITFunction.run: `kernel.run(..., *bound_args.values())`),
# which is what a plan's direct_tail reproduces: checked against the installed Triton by
# tests/test_triton_host.py (test_direct_launch_arguments_match_tritons_binding); another
# version takes the ordinary path until it is checked and added here.
DIRECT_LAUNCH_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))


def _direct_launch_supported() -> bool:
    from triton.compiler import CompiledKernel
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    return version in DIRECT_LAUNCH_VERSIONS and hasattr(CompiledKernel, "__getitem__")


# The direct launch of compiled kernels (above); False: every call through kernel[grid].
DIRECT_LAUNCH = os.environ.get("RSIR_TRITON_DIRECT_LAUNCH", "1") != "0" and _direct_launch_supported()


def forward_into(q, k, v, index, window_size: int, scale: float, out, lse,
                 config: Optional[Config] = None) -> None:
    """Writes out (B, L, H, D) and lse (B, H, L) float32, both in the original token order;
    rows of tokens that no window visits are left as they are."""
    plan, _ = _forward_plan(q.shape, q.stride(), k.stride(), v.stride(), index.shape, index.stride(), out.stride(),
                            lse.stride(), q.dtype, q.device, window_size, scale, config)
    if plan.grid[0]:
        _launch(window_attn_fwd_kernel, plan, (q, k, v, index, out, lse))


def backward_into(dout, q, k, v, index, window_size: int, scale: float, dqkv,
                  config: Optional[Config] = None) -> None:
    """Writes dq, dk, dv into dqkv (B, L, 3, H, D), each row at its original token position.
    The kernels recompute the softmax from the scores: nothing of the forward is read."""
    plan, cfg = _backward_plan(q.shape, dout.stride(), q.stride(), k.stride(), v.stride(), index.shape,
                               index.stride(), dqkv.stride(), q.dtype, q.device, window_size, scale, config)
    if not plan.grid[0]:
        return
    # the multi-tile path keeps each row's (max, 1 / sum, top, delta) between its two passes (kernels.py)
    # the multi-tile path's (B, H, L, 4) fp32 scratch (kernels.py); the single-tile path reads
    # none and gets dqkv as a pointer it never touches (inline: this is the eager hot path)
    stats = dqkv if cfg.single else q.new_empty((q.shape[0], q.shape[2], q.shape[1], 4), dtype=torch.float32)
    _launch(window_attn_bwd_kernel, plan, (dout, q, k, v, index, dqkv, stats))


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
    programs = batch * heads * _cdiv(length, n) * _cdiv(n, 16)
    if programs > MAX_PROGRAMS:
        return f"{programs} programs (B * H * windows * query tiles) > {MAX_PROGRAMS}, the grid's limit"
    if q.device.type == "cpu":
        return None if INTERPRET else "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    if q.device.type != "cuda":
        return f"device type {q.device.type!r} is not supported (CUDA only)"
    return None


# ---------------------------------------------------------------- the ops

def _allocate_forward(q):
    """out (B, L, H, D) and lse (B, H, L) float32. out is zeros, not empty: with an unchecked
    index that is no permutation, tokens that no window visits are never written and read 0
    (the backends' shared contract); lse of such a token is unspecified."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse


def _allocate_backward(q):
    """dqkv (B, L, 3, H, D), zeros for the same reason as out."""
    batch, length, heads, dim = q.shape
    return torch.zeros((batch, length, 3, heads, dim), dtype=q.dtype, device=q.device)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _allocate_forward(q)
    forward_into(q, k, v, index, window_size, scale, out, lse)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
             window_size: int, scale: float) -> torch.Tensor:
    dqkv = _allocate_backward(q)
    backward_into(dout, q, k, v, index, window_size, scale, dqkv)
    return dqkv


def _static(sizes) -> tuple:
    """Plain ints from a traced tensor's sizes or strides (a SymInt is specialized: a guard)."""
    return tuple(int(x) for x in sizes)


def _traceable_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
                       window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward through wrap_triton, which Inductor traces into its own generated code."""
    out, lse = _allocate_forward(q)
    plan, _ = _forward_plan.__wrapped__(_static(q.shape), _static(q.stride()), _static(k.stride()),
                                        _static(v.stride()), _static(index.shape), _static(index.stride()),
                                        _static(out.stride()), _static(lse.stride()), q.dtype, q.device,
                                        window_size, scale, None)
    if plan.grid[0]:
        wrap_triton(window_attn_fwd_kernel)[plan.grid](q, k, v, index, out, lse, *plan.args, **plan.constexprs)
    return out, lse


def _traceable_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        index: torch.Tensor, window_size: int, scale: float) -> torch.Tensor:
    dqkv = _allocate_backward(q)
    plan, cfg = _backward_plan.__wrapped__(_static(q.shape), _static(dout.stride()), _static(q.stride()),
                                           _static(k.stride()), _static(v.stride()), _static(index.shape),
                                           _static(index.stride()), _static(dqkv.stride()), q.dtype, q.device,
                                           window_size, scale, None)
    if plan.grid[0]:
        stats = dqkv if cfg.single else q.new_empty((q.shape[0], q.shape[2], q.shape[1], 4), dtype=torch.float32)
        wrap_triton(window_attn_bwd_kernel)[plan.grid](dout, q, k, v, index, dqkv, stats, *plan.args,
                                                       **plan.constexprs)
    return dqkv


# CUDA, compiled kernels: torch.library.triton_op, so that Inductor launches the kernels from
# its generated code (no opaque custom-op call in a compiled graph). Under the interpreter
# (CPU tensors) triton_op fails opcheck and torch.compile (it touches real storage under fake
# tensors: docs/design.md section 6), so there, and where torch lacks triton_op, the ops are
# torch.library.custom_op with register_fake. Plain eager calls run forward / backward above
# either way (rsir_kernels.ops), with the direct launch.
OP_KIND = ("triton_op" if not INTERPRET and torch.cuda.is_available() and hasattr(torch.library, "triton_op")
           else "custom_op")

if OP_KIND == "triton_op":
    from torch.library import wrap_triton

    window_attention_fwd = torch.library.triton_op(FORWARD_OP, mutates_args=())(_traceable_forward)
    window_attention_bwd = torch.library.triton_op(BACKWARD_OP, mutates_args=())(_traceable_backward)
else:
    window_attention_fwd = torch.library.custom_op(FORWARD_OP, mutates_args=())(forward)
    window_attention_bwd = torch.library.custom_op(BACKWARD_OP, mutates_args=())(backward)
    register_fakes(FORWARD_OP, BACKWARD_OP)
