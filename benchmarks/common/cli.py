"""What the command lines of bench_attn.py, bench_model.py and bench_dense.py share: the --dtype
names, the --device check, the start of a run (threads, device and dtype), and where results go
(OUT by default, RESULTS on request)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"   # benchmarks/results: the committed figures
# Where a run writes by default: benchmarks/out/, ignored by git, so `make bench` leaves a clone
# clean. Refreshing the committed figures is explicit: --out benchmarks/results (make bench-refresh).
OUT = Path(__file__).resolve().parents[1] / "out"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


def resolve_device(parser: argparse.ArgumentParser, name: Optional[str]) -> torch.device:
    """--device: the GPU if there is one, else the CPU, by default; a name torch does not know,
    or a CUDA device (or index) that this machine lacks, is parser.error (one line, exit status 2) before
    anything is built. A bare "cuda" becomes the current device ("cuda:0")."""
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        parser.error(f"--device {name}: {e}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {name}: this machine has no CUDA device (torch {torch.__version__}: "
                         f"torch.cuda.is_available() is False); use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        elif device.index >= torch.cuda.device_count():
            parser.error(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def start_run(args) -> tuple[torch.device, torch.dtype]:
    """Applies --threads, resolves --dtype (args.dtype becomes its canonical name, e.g.
    'bfloat16' for 'bf16') and returns (device, dtype)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    args.dtype = str(dtype).replace("torch.", "")
    return device, dtype
