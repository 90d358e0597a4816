"""Host time of one forward + backward through the eager shell (EagerWindowAttention, torch's
older forward(ctx, ...) style) against the same call through WindowAttention (setup_context
style, which binds the forward's signature with inspect on every apply), on a small CPU
input where the kernels take a few microseconds: median over interleaved rounds of the
per-call mean.

    python -m benchmarks.tools.autograd_shell [--backend cpp] [--rounds 30] [--calls 200]
"""
import argparse
import statistics

import torch

import rsir_kernels as rk
from rsir_kernels import autograd_functions, backends

from ..common.timing import per_call_seconds


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", default="cpp")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    kernels = backends.get(args.backend).direct  # what a plain eager call runs
    qkv = torch.randn(1, 49, 3, 2, 16, requires_grad=True)
    index = rk.rs_index(1, 7, 7, 7, groups=2)
    dout = torch.randn(1, 49, 2, 16)
    steps = {}
    for name, function in (("EagerWindowAttention", autograd_functions.EagerWindowAttention),
                           ("WindowAttention", autograd_functions.WindowAttention)):
        def step(function=function):
            out = function.apply(index, 49, 0.25, kernels, qkv)
            torch.autograd.grad(out, (qkv,), dout)
        steps[name] = step
    for name, means in zip(steps, per_call_seconds(list(steps.values()), args.calls, args.rounds)):
        print(f"{name:22s} {statistics.median(means) * 1e3:.3f} ms forward + backward ({args.backend})")


if __name__ == "__main__":
    main()
