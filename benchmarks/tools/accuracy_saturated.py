"""How often each backend's fp16/bf16 gradients miss the 2x rule at a saturated softmax.

    TRITON_INTERPRET=1 python -m benchmarks.tools.accuracy_saturated [--backends reference,triton,cpp]

Scale 1 at head dim 32 with tiny windows makes P nearly one-hot, where dS = P * (dP - delta)
cancels. For each backend and dtype, 100 cases ((L, window, H) in (2, 3, 1), (4, 2, 2),
(7, 2, 1), (20, 3, 2), 25 seeds each; packed and separate q, k, v alternate) are checked with
benchmarks.common.measure.check_close, forward and the three gradients: error at most 2x the
same-precision reference's plus 1e-3. Prints the failures per backend and dtype
(docs/performance.md, "Accuracy of the backward at a saturated softmax").
Without a GPU the triton backend needs TRITON_INTERPRET=1, set before triton is imported.
"""
from __future__ import annotations

import argparse
import sys

import torch

import rsir_kernels as rk
from benchmarks.common.measure import check_close
from rsir_kernels import reference
from rsir_kernels.samplers import rs_index

SHAPES = ((2, 3, 1), (4, 2, 2), (7, 2, 1), (20, 3, 2))  # (L, window, H)
HEAD_DIM = 32


def make_case(length, heads, dtype, device, seed, packed):
    """q, k, v (1, L, H, 32) leaves or views of one packed leaf, a random order (1, 1, L), dout."""
    gen = torch.Generator().manual_seed(seed)
    if packed:
        qkv = torch.randn(1, length, 3, heads, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
        q, k, v = qkv.unbind(2)
    else:
        q, k, v = (torch.randn(1, length, heads, HEAD_DIM, generator=gen).to(device, dtype).requires_grad_()
                   for _ in range(3))
    index = rs_index(1, 1, length, 1, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    dout = torch.randn(1, length, heads, HEAD_DIM, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    return (q, k, v), index, dout


def misses_rule(backend, leaves, index, window, dout) -> bool:
    """True when out, dq, dk or dv of `backend` misses the 2x rule against the float64 reference."""
    out = rk.window_attention(*leaves, index, window, scale=1.0, backend=backend)
    got = (out, *torch.autograd.grad(out, leaves, dout))

    def ref(dtype, upcast):
        xs = [t.detach().to(dtype).requires_grad_() for t in leaves]
        o = reference.window_attention_reference(*xs, index, window, 1.0, upcast=upcast)
        return (o.detach(), *torch.autograd.grad(o, xs, dout.to(dtype)))
    exact, low = ref(torch.float64, True), ref(dout.dtype, False)
    return not all(check_close(a, e, lp)[0] for a, e, lp in zip(got, exact, low))


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
                    leaves, index, dout = make_case(length, heads, dtype, device, seed, packed=bool(seed % 2))
                    failures += misses_rule(name, leaves, index, window, dout)
            print(f"{name:10s} {str(dtype):15s} {failures:3d} of {total} cases miss the 2x rule", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
