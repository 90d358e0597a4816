"""pytest-benchmark set-up for benchmarks/ (run with `pytest benchmarks/ --benchmark-only`).

Not collected by `pytest tests` (make test). It puts benchmarks/ and the repository root on
sys.path, so that test_bench_attn.py imports bench_attn and measure. TRITON_INTERPRET is
deliberately left alone: the Triton interpreter is never benchmarked.
"""
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (str(HERE), str(HERE.parent)):
    if p not in sys.path:
        sys.path.insert(0, p)
