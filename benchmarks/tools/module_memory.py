"""Bytes one RSIRAttention keeps for backward, against the same module with its attention done
by the pure-PyTorch path (gather, SDPA on windows, scatter), at an RSIR-T stage shape.

    python -m benchmarks.tools.module_memory [--stage 1] [--batch 2] [--backend auto]

Counts the unique storages autograd packs during one forward (benchmarks/common/measure.py's rule),
for the plain module, the module with recompute_qkv=True and the pure-PyTorch variant; fp32, CPU.
"""
from __future__ import annotations

import argparse
import sys

import torch

import rsir_kernels as rk
from benchmarks.common import measure
from benchmarks.common.cases import N, stage_shapes
from rsir_kernels import baselines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    shape = stage_shapes("tiny")[args.stage - 1]
    side, channels, heads = shape.height, shape.channels, shape.heads
    x = torch.randn(args.batch, side, side, channels, requires_grad=True)
    module = rk.RSIRAttention(channels, heads, 7, backend=args.backend, generator=torch.Generator().manual_seed(1))

    def pytorch_path():
        tokens = x.reshape(args.batch, side * side, channels)
        index = module.token_order(tokens, side, side)
        q, k, v = module.qkv(tokens).unflatten(-1, (3, heads, channels // heads)).unbind(2)
        return module.proj(baselines.torch_window_attention(q, k, v, index, N).flatten(2))

    baseline = measure.saved_bytes(pytorch_path)[0]
    plain = measure.saved_bytes(lambda: module(x))[0]
    module.recompute_qkv = True
    recompute = measure.saved_bytes(lambda: module(x))[0]
    mib = 2 ** 20
    print(f"RSIRAttention at RSIR-T stage {shape.stage} ({shape.describe()}), batch {args.batch}, fp32, "
          f"backend {args.backend}: bytes kept for backward")
    print(f"  attention by the pure-PyTorch path   {baseline / mib:7.2f} MiB   1.00")
    print(f"  RSIRAttention                        {plain / mib:7.2f} MiB   {plain / baseline:.2f}")
    print(f"  RSIRAttention(recompute_qkv=True)    {recompute / mib:7.2f} MiB   {recompute / baseline:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
