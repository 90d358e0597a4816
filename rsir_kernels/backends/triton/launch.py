"""Launchers of the Triton kernels: what the triton backend's kernels run.

`forward_into` / `backward_into` write into caller-given buffers (tests poison them with NaN
first); `forward` / `backward` allocate (zero-filled outputs) and call them: the backend's
Python implementation, which plain eager calls run directly (rsir_kernels.routing), through a
per-shape launch plan (plans.py) and, on CUDA, a direct launch of the compiled kernel.
Inputs are assumed valid (rsir_kernels.ops checks them); the kernels still mask every load
and store by the token index, so a bad index never touches memory out of bounds.

Direct launch: on CUDA a plan keeps Triton's compiled kernel after its first ordinary
`kernel[grid](...)` launch and later calls launch it directly (`compiled[grid](*args)`),
skipping Triton's per-call argument binding, specialization and cache-key hashing. That reuse
is valid because nothing a call can change selects another compiled kernel: every integer and
float argument is `do_not_specialize` (kernels.py) and in the plan's key (with the index's
token stride, the one specialized integer), and the tensors' dtypes and 16-byte pointer
alignment, which Triton specializes on, key the plan's stored kernels. Under the interpreter,
or where a Triton version lacks CompiledKernel.__getitem__, every call takes the ordinary
path; RSIR_TRITON_DIRECT_LAUNCH=0 forces it everywhere.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch
import triton

from .config import Config
from .kernels import window_attn_bwd_kernel, window_attn_fwd_kernel
from .plans import Plan, backward_plan, forward_plan

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


def _launch(kernel, plan: Plan, tensors) -> None:
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


def forward_into(q, k, v, index, window_size: int, scale: float, out, lse,
                 config: Optional[Config] = None) -> None:
    """Writes out (B, L, H, D) and lse (B, H, L) float32, both in the original token order;
    rows of tokens that no window visits are left as they are."""
    plan, _ = forward_plan(q.shape, q.stride(), k.stride(), v.stride(), index.shape, index.stride(), out.stride(),
                           lse.stride(), q.dtype, q.device, window_size, scale, config)
    if plan.grid[0]:
        _launch(window_attn_fwd_kernel, plan, (q, k, v, index, out, lse))


def backward_into(dout, q, k, v, index, window_size: int, scale: float, dqkv,
                  config: Optional[Config] = None) -> None:
    """Writes dq, dk, dv into dqkv (B, L, 3, H, D), each row at its original token position.
    The kernels recompute the softmax from the scores: nothing of the forward is read."""
    plan, cfg = backward_plan(q.shape, dout.stride(), q.stride(), k.stride(), v.stride(), index.shape,
                              index.stride(), dqkv.stride(), q.dtype, q.device, window_size, scale, config)
    if not plan.grid[0]:
        return
    # the multi-tile path's (B, H, L, 4) fp32 scratch: each row's (max, 1 / sum, top, delta)
    # between its two passes (kernels.py); the single-tile path reads none and gets dqkv as a
    # pointer it never touches (inline: this is the eager hot path)
    stats = dqkv if cfg.single else q.new_empty((q.shape[0], q.shape[2], q.shape[1], 4), dtype=torch.float32)
    _launch(window_attn_bwd_kernel, plan, (dout, q, k, v, index, dqkv, stats))


def allocate_forward(q):
    """out (B, L, H, D) and lse (B, H, L) float32. out is zeros, not empty: with an unchecked
    index that is no permutation, tokens that no window visits are never written and read 0
    (the backends' shared contract); lse of such a token is unspecified."""
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    return out, lse


def allocate_backward(q):
    """dqkv (B, L, 3, H, D), zeros for the same reason as out."""
    batch, length, heads, dim = q.shape
    return torch.zeros((batch, length, 3, heads, dim), dtype=q.dtype, device=q.device)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
            window_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, L, H, D), lse (B, H, L) float32) for q, k, v (B, L, H, D), index (B, G, L)."""
    out, lse = allocate_forward(q)
    forward_into(q, k, v, index, window_size, scale, out, lse)
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor,
             window_size: int, scale: float) -> torch.Tensor:
    """dqkv (B, L, 3, H, D) for dout, q, k, v (B, L, H, D), index (B, G, L)."""
    dqkv = allocate_backward(q)
    backward_into(dout, q, k, v, index, window_size, scale, dqkv)
    return dqkv
