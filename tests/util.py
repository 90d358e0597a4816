"""Shared helpers for the tests: fresh random inputs, NaN poisoning, the tolerance rule.

Every backend is compared with rsir_kernels.reference (imported, never copied) by
`assert_matches_reference`, forward and the three gradients, with the project's one tolerance
rule, reference.tolerance_failure (docs/design.md section 4): fp32 within 1e-5 relative; fp16/bf16
within 2x the error of the same-precision reference against float64 plus 1e-3; fp64 within 1e-10.
"""
from __future__ import annotations

import torch

from rsir_kernels import reference
from rsir_kernels.samplers import rs_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_qkv(batch, length, heads, dim, dtype=torch.float32, device=DEVICE, packed=True, seed=0,
             requires_grad=True):
    """Fresh random q, k, v (B, L, H, D); packed=True makes them strided views of one
    (B, L, 3, H, D) tensor, as a module's qkv projection gives them."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(batch, length, 3, heads, dim, generator=gen).to(device, dtype)
        qkv.requires_grad_(requires_grad)
        return qkv.unbind(2)
    return tuple(torch.randn(batch, length, heads, dim, generator=gen).to(device, dtype).requires_grad_(requires_grad)
                 for _ in range(3))


def make_index(batch, length, groups, device=DEVICE, dtype=torch.int64, seed=1):
    """Random permutations (B, G, L)."""
    gen = torch.Generator().manual_seed(seed)
    return rs_index(batch, 1, length, 1, groups=groups, generator=gen).to(device, dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN, so that a row a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))


max_rel_error = reference.max_rel_error  # the project's one definition (reference.py)


def assert_close_to(actual, exact, low_precision=None, name=""):
    """actual vs the float64 `exact` by the project's tolerance rule (reference.tolerance_failure);
    for fp16/bf16, `low_precision` is the same-precision reference."""
    why = reference.tolerance_failure(actual, exact, low_precision)
    assert why is None, f"{name}: {why}"


def assert_matches_reference(fn, q, k, v, index, window_size, scale=None, seed=2):
    """Runs fn(q, k, v, index, window_size, scale=...) forward and backward; compares out,
    dq, dk, dv with the float64 reference (and, in fp16/bf16, with the same-precision one)."""
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=gen).to(q.device, q.dtype)
    out = fn(q, k, v, index, window_size, scale=scale)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def ref(dtype, upcast):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o = reference.window_attention_reference(*leaves, index, window_size, scale, upcast=upcast)
        return (o, *torch.autograd.grad(o, leaves, dout.to(dtype)))

    exact = [t.detach() for t in ref(torch.float64, True)]
    low = ref(q.dtype, False) if q.dtype in (torch.float16, torch.bfloat16) else [None] * 4
    for name, a, e, lp in zip(("out", "dq", "dk", "dv"), (out, *grads), exact, low):
        assert_close_to(a, e, lp, name)


def fix_ir_order(monkeypatch, seed: int = 7):
    """Replaces IR-Win's order (tokens sorted by their channel mean) by a fixed permutation per
    resolution, for comparing a compiled model with eager: compiled code rounds differently
    (fused LayerNorm, other reduction orders), which reorders near-tied channel means and so
    changes whole windows several layers deep. With one order for both, the compiled model
    must match eager at the project's tolerance (never a looser one)."""
    from rsir_kernels import modules, samplers

    def ir_index(x, height, width, window):
        order = samplers.fixed_rs_index(height, width, window, seed, x.device)
        return order.expand(x.shape[0], 1, height * width)

    monkeypatch.setattr(modules, "ir_index", ir_index)
