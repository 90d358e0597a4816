"""What the command lines of bench_attn.py and bench_model.py share: the --dtype names and the
start of a run (threads, device and dtype), and where results go (OUT by default, RESULTS on request)."""
from __future__ import annotations

from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"   # benchmarks/results: the committed figures
# Where a run writes by default: benchmarks/out/, ignored by git, so `make bench` leaves a clone
# clean. Refreshing the committed figures is explicit: --out benchmarks/results (make bench-refresh).
OUT = Path(__file__).resolve().parents[1] / "out"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


def start_run(args) -> tuple[torch.device, torch.dtype]:
    """Applies --threads, resolves --dtype (args.dtype becomes its canonical name, e.g.
    'bfloat16' for 'bf16') and returns (device, dtype)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    args.dtype = str(dtype).replace("torch.", "")
    return device, dtype
