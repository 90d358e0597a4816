"""What the command lines of bench_attn.py and bench_model.py share: the --dtype names and the
start of a run (threads, device and dtype)."""
from __future__ import annotations

import torch

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
