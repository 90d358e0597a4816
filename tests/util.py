"""Shared helpers for the tests: fresh random inputs, NaN poisoning, the tolerance rule.

Every backend is compared with rsir_kernels.reference (imported, never copied) by
`assert_matches_reference`, forward and the three gradients, with the project's one tolerance
rule, reference.tolerance_failure (docs/design.md section 4): fp32 within 1e-5 relative; fp16/bf16
within 2x the error of the same-precision reference against float64 plus 1e-3; fp64 within 1e-10.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys

import torch

from rsir_kernels import reference
from rsir_kernels.samplers import rs_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def fuzz_script():
    """scripts/fuzz.py as a module (a script, not part of the package): its cases, ISA names and
    `_isa_runs` (whether this CPU runs an ISA build)."""
    spec = importlib.util.spec_from_file_location("rsir_fuzz", os.path.join(ROOT, "scripts", "fuzz.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_cpu_build(code: str, isa: str, *args: str, timeout: float = 600):
    """`python -c code *args` from the repository root with the CPU core capped at RSIR_CPU_ISA=isa
    (the core picks its build once per process, so one process per build) and outputs poisoned
    (RSIR_POISON=1); asserts it exits 0 and returns the JSON its last line prints."""
    env = dict(os.environ, RSIR_CPU_ISA=isa, RSIR_POISON="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
