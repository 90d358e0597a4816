"""Host time of one call through the public entry point, on the eager routes, on a small CPU
input where the kernels take a few microseconds: what the glue (validation, route choice, the
autograd shell) costs. 1 thread; the clock is this thread's CPU time (time.thread_time), so
that time spent descheduled on a loaded host does not count; the median and the minimum over
interleaved rounds of the per-call mean.

    python -m benchmarks.tools.route_host_time [--backends cpp reference] [--rounds 30] [--calls 200]

Rows, each for a packed qkv (1, 49, 3, 2, 16) fp32, index (1, 2, 49), window 49:
- forward+backward: rk.window_attention_qkvpacked(..., check_index=False) then autograd.grad
  (the eager route with a derivative: the old-style autograd shell);
- forward no-grad: the same call under torch.no_grad() (no autograd.Function);
- module forward+backward: RSIRAttention(32, 2, window_size=7) on (1, 7, 7, 32), as a model
  calls it (qkv projection, index, op, output projection).
"""
import argparse
import statistics
import time

import torch

import rsir_kernels as rk

from ..common.timing import per_call_seconds


def rows(backend: str):
    """(name, callable) pairs for one backend."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 49, 3, 2, 16, generator=gen, requires_grad=True)
    index = rk.rs_index(1, 7, 7, 7, groups=2)
    dout = torch.randn(1, 49, 2, 16, generator=gen)
    module = rk.RSIRAttention(32, 2, window_size=7, backend=backend)
    x = torch.randn(1, 7, 7, 32, generator=gen, requires_grad=True)
    dx = torch.randn(1, 7, 7, 32, generator=gen)

    def forward_backward():
        out = rk.window_attention_qkvpacked(qkv, index, 49, backend=backend, check_index=False)
        torch.autograd.grad(out, (qkv,), dout)

    def forward_no_grad():
        with torch.no_grad():
            rk.window_attention_qkvpacked(qkv, index, 49, backend=backend, check_index=False)

    def module_forward_backward():
        torch.autograd.grad(module(x), (x,), dx)

    return (("forward+backward", forward_backward), ("forward no-grad", forward_no_grad),
            ("module forward+backward", module_forward_backward))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", default=["cpp", "reference"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for backend in args.backends:
        names, fns = zip(*rows(backend))
        for name, means in zip(names, per_call_seconds(fns, args.calls, args.rounds, clock=time.thread_time)):
            print(f"{backend:10s} {name:24s} median {statistics.median(means) * 1e3:.3f} ms, "
                  f"min {min(means) * 1e3:.3f} ms")


if __name__ == "__main__":
    main()
