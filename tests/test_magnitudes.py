"""fp32 accuracy at any score magnitude, every backend and every ISA build of the CPU core.

q, k ~ N(0, 1) x m (m from 1 to 1e4) or N(0, 1) inputs with a softmax scale up to 1e4: the
scores reach 1e8, the softmax saturates. Wherever the float64 result is finite, each
backend's fp32 out, dq, dk, dv must be within the project's fp32 rule (1e-5 relative), or,
where the fp32 reference itself is further off (large scores make the problem
ill-conditioned: the rounding of q.k alone moves the exponent), within 2x the fp32
reference's own error level, the same 2x rule as fp16/bf16 (tests/util.py). That level is
the largest error over a few equally valid evaluations of the reference (error_level in
scripts/fuzz.py): one order's error is a single draw.

The CPU core picks its ISA build once per process, so each RSIR_CPU_ISA variant runs in a
subprocess of its own (`python tests/test_magnitudes.py` runs the cases and prints JSON).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import reference

from util import fuzz_script, max_rel_error

fuzz = fuzz_script()

# (magnitude of q and k, scale or None for D ** -0.5); plus random draws (seeded) in the same range
GRID = [(1.0, None), (10.0, None), (100.0, None), (1e3, None), (1e4, None), (1.0, 1e2), (1.0, 1e4), (30.0, 30.0)]


def magnitude_cases(draws=4, seed=13):
    """The grid plus `draws` log-uniform (m in [1, 1e4], scale in [1e-2, 1e4] or default) cases."""
    rng = random.Random(seed)
    drawn = [(10 ** rng.uniform(0, 4), rng.choice([None, 10 ** rng.uniform(-2, 4)])) for _ in range(draws)]
    return GRID + drawn


def check_case(backend, m, scale, seed=0, shape=(1, 60, 2, 16, 2, 16), device="cpu"):
    """Errors of `backend` (on `device`) and of the fp32 reference (CPU) against float64 at
    magnitude m.

    shape: (B, L, H, D, G, N) (L % N != 0: a partial last window). Returns a list of
    failure messages (empty when every tensor is within the rule)."""
    batch, length, heads, dim, groups, n = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, dim, generator=gen) * m
    k = torch.randn(batch, length, heads, dim, generator=gen) * m
    v = torch.randn(batch, length, heads, dim, generator=gen)
    dout = torch.randn(batch, length, heads, dim, generator=gen)
    idx = torch.stack([torch.stack([torch.randperm(length, generator=gen) for _ in range(groups)])
                       for _ in range(batch)])

    def run(dtype, fn, on="cpu"):
        leaves = [t.to(on, dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        return [t.cpu() for t in (out.detach(), *torch.autograd.grad(out, leaves, dout.to(on, dtype)))]

    exact = run(torch.float64, lambda *t: reference.window_attention_reference(*t, idx, n, scale, upcast=True))
    if not all(torch.isfinite(e).all() for e in exact):
        return []  # the rule covers finite float64 results only
    level = fuzz.error_level(q, k, v, idx, n, scale, dout, exact, torch.float32)
    got = run(torch.float32, lambda *t: rk.window_attention(*t, idx.to(device), n, scale=scale, backend=backend),
              device)
    failures = []
    for name, a, e, ref_err in zip(("out", "dq", "dk", "dv"), got, exact, level):
        err = max_rel_error(a, e)
        if not err <= max(1e-5, 2 * ref_err):
            failures.append(f"{backend} m={m:.3g} scale={scale}: {name} relative error {err:.3g} > "
                            f"max(1e-5, 2 x fp32 reference's {ref_err:.3g})")
    return failures


def _runnable(backend):
    if backend == "cpp":
        return rk.available_backends()["cpp"].available
    if backend == "triton":  # CUDA, or CPU tensors under the interpreter (tests/conftest.py)
        return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    return True


@pytest.mark.parametrize("case", magnitude_cases(), ids=lambda c: f"m{c[0]:.3g}-scale{c[1]}")
@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_fp32_at_any_magnitude(backend, case):
    if not _runnable(backend):
        pytest.skip(f"backend {backend!r} cannot run here")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    assert check_case(backend, *case, device=device) == []


@pytest.mark.parametrize("isa,name", [("avx512amx", "avx512+amx"), ("avx512", "avx512"), ("avx2", "avx2+fma"),
                                      ("generic", "generic")])
def test_cpp_every_isa_at_any_magnitude(isa, name):
    if not _runnable("cpp"):
        pytest.skip("backend 'cpp' unavailable")
    if isa.startswith("avx512") and not fuzz._isa_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    env = dict(os.environ, RSIR_CPU_ISA=isa, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if isa == "avx2" and result["isa"] == "generic":
        pytest.skip("this CPU has no AVX2 + FMA")
    assert result["isa"] == name
    assert result["failures"] == []


if __name__ == "__main__":  # one process per ISA build (RSIR_CPU_ISA is read once)
    from rsir_kernels.backends import cpp

    torch.set_num_threads(1)
    fails = [f for case in magnitude_cases() for f in check_case("cpp", *case)]
    print(json.dumps({"isa": cpp.CPU_ISA, "failures": fails}))
