"""Micro-benchmarks of window attention with pytest-benchmark: the cases of bench_attn.py.

    python -m pytest benchmarks/test_bench_attn.py --benchmark-only
    python -m pytest benchmarks/test_bench_attn.py --benchmark-only --benchmark-autosave
    python -m pytest benchmarks/test_bench_attn.py --benchmark-only --benchmark-compare

One benchmark per (stage, row, pass): row = every available rsir_kernels backend that can
run the inputs, and the baselines paper / torch / sdpa-windows; pass = fwd (no_grad) or
fwdbwd. Each row is checked against the reference (benchmarks.common.checks.check_row) before it is
timed. Small by default (batch 2 on CPU, about a minute): RSIR_BENCH_BATCH, RSIR_BENCH_DTYPE
and RSIR_BENCH_MODEL (tiny/base) change the inputs; on a GPU the default is batch 64 bf16.
RSIR_BENCH_TIME (default 0.5) is the seconds of timed rounds per benchmark (3 to 200 rounds;
pytest-benchmark's own --benchmark-min-rounds / --benchmark-max-time do not apply).
"""
from __future__ import annotations

import functools
import os
import time

import pytest
import torch

from benchmarks.common import cases, checks, cli, timing
from rsir_kernels import backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = cli.DTYPES[os.environ.get("RSIR_BENCH_DTYPE", "bfloat16" if DEVICE.type == "cuda" else "float32")]
BATCH = int(os.environ.get("RSIR_BENCH_BATCH", "64" if DEVICE.type == "cuda" else "2"))
MODEL = os.environ.get("RSIR_BENCH_MODEL", "tiny")
TIME_PER_CASE = float(os.environ.get("RSIR_BENCH_TIME", "0.5"))  # seconds of timed rounds per benchmark
SHAPES = cases.stage_shapes(MODEL)
ROWS = [n for n in backends.names() if backends.get(n).unavailable is None] + list(cases.BASELINES)


@functools.lru_cache(maxsize=1)
def _inputs_for(stage: int):
    """Inputs, rows and the reference of one stage (cached: one stage at a time)."""
    shape = SHAPES[stage - 1]
    inp = cases.make_inputs(shape, BATCH, DEVICE, DTYPE)
    names, skipped = cases.select_backends(None, inp.qkv[:, :, 0])
    rows = {r.name: r for r in [cases.backend_row(n, inp) for n in names] + cases.baseline_rows(inp)}
    exact = checks.exact_reference(inp, torch.float64)
    low = checks.exact_reference(inp, DTYPE, upcast=False) if DTYPE in (torch.float16, torch.bfloat16) else None
    return shape, rows, skipped, exact, low, {}


def _synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("row_name", ROWS)
@pytest.mark.parametrize("stage", [s.stage for s in SHAPES], ids=lambda s: f"stage{s}")
def test_window_attention(benchmark, stage, row_name, mode):
    shape, rows, skipped, exact, low, checked = _inputs_for(stage)
    if row_name not in rows:
        pytest.skip(f"{row_name}: {skipped.get(row_name, 'not run')}")
    row = rows[row_name]
    if row_name not in checked:
        checked[row_name] = checks.check_row(row, exact, low)
    assert checked[row_name]["passed"], f"{row_name} does not match the reference: {checked[row_name]['detail']}"
    fn = timing.forward_fn(row) if mode == "fwd" else timing.forward_backward_fn(row)
    benchmark.group = f"stage{stage} {shape.describe()} B{BATCH} {str(DTYPE).replace('torch.', '')} {mode}"
    benchmark.extra_info.update(stage=stage, shape=shape.describe(), batch=BATCH, dtype=str(DTYPE),
                                device=str(DEVICE), row=row_name, kind=row.kind, mode=mode)
    fn = _synchronized(fn)
    fn()  # warm-up outside the timing (first-call allocations, Triton compilation, autotuning)
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    # As many rounds as fit in TIME_PER_CASE seconds, 3 at least, 200 at most: the whole
    # file stays near a minute on 2 CPU cores.
    rounds = int(min(200, max(3, TIME_PER_CASE // once)))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
