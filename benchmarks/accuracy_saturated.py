"""How often each backend's fp16/bf16 gradients miss the 2x rule at a saturated softmax.

    TRITON_INTERPRET=1 python benchmarks/accuracy_saturated.py [--backends reference,triton,cpp]

Scale 1 at head dim 32 with tiny windows makes P nearly one-hot, where dS = P * (dP - delta)
cancels. For each backend and dtype, 100 cases ((L, window, H) in (2, 3, 1), (4, 2, 2),
(7, 2, 1), (20, 3, 2), 25 seeds each; packed and separate q, k, v alternate) are checked by
tests/util.assert_matches_reference: error at most 2x the same-precision reference's plus 1e-3.
Prints the failures per backend and dtype (benchmarks/NOTES.md, "Accuracy of the backward").
Without a GPU the triton backend needs TRITON_INTERPRET=1, set before triton is imported.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import rsir_kernels as rk  # noqa: E402
from util import assert_matches_reference, make_index, make_qkv  # noqa: E402

SHAPES = ((2, 3, 1), (4, 2, 2), (7, 2, 1), (20, 3, 2))  # (L, window, H)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="reference,triton,cpp")
    parser.add_argument("--seeds", type=int, default=25)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    available = rk.available_backends()
    for name in args.backends.split(","):
        if not available[name].available:
            print(f"{name:10s} not available: {available[name].reason}")
            continue
        for dtype in (torch.float16, torch.bfloat16):
            failures, total = 0, 0
            for length, window, heads in SHAPES:
                for seed in range(args.seeds):
                    total += 1
                    q, k, v = make_qkv(1, length, heads, 32, dtype=dtype, device=device, seed=seed,
                                       packed=bool(seed % 2))
                    index = make_index(1, length, 1, device=device, seed=seed + 1)
                    try:
                        assert_matches_reference(
                            lambda *a, **kw: rk.window_attention(*a, **kw, backend=name),
                            q, k, v, index, window, 1.0, seed=seed)
                    except AssertionError:
                        failures += 1
            print(f"{name:10s} {str(dtype):15s} {failures:3d} of {total} cases miss the 2x rule", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
