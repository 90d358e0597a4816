"""The CPU core against this machine's limits, in one process: the figures behind the targets of
docs/performance.md ("The core against the machine").

    python -m benchmarks.tools.cpu_roofline [--rounds 15] [--batch 8] [--threads 1]

Measures, interleaved (one run of each candidate per round, medians over the rounds, the
thread's CPU time with one thread, wall time otherwise):
  - the roofline: torch.mm 2048^3 in fp32 and bf16 (GFLOP/s), and copy bandwidth (GB/s, read +
    write of a 64 MiB tensor);
  - RSIR-T stage 1 (B x 56*56 tokens, 4 heads in 2 groups, D = 16, windows of 49, RS-Win index):
    the `cpp` forward in fp32 and bf16, the `torch` path's (gather, SDPA, scatter) forward, and
    forward+backward of both through window_attention_qkvpacked (RSIRAttention's route) and
    through window_attention on q, k, v views (autograd then stacks dq, dk, dv).
Prints the ratios next to the targets: fp32 forward as a share of the fp32 GEMM peak, forward+
backward against `torch`, bf16 forward against fp32 (with the CPU build that ran).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import rsir_kernels as rk
from rsir_kernels import baselines, flops
from rsir_kernels.samplers import rs_index


def interleaved_medians(fns: dict, rounds: int, clock) -> dict:
    """Median seconds of each fn, one run of each per round after two warm-up runs."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    gen = torch.Generator().manual_seed(0)

    a, b = torch.randn(2048, 2048, generator=gen), torch.randn(2048, 2048, generator=gen)
    a16, b16 = a.bfloat16(), b.bfloat16()
    src = torch.empty(64 << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)

    length, heads, dim, window, groups = 56 * 56, 4, 16, 49, 2
    qkv = torch.randn(args.batch, length, 3, heads, dim, generator=gen)
    qkv16 = qkv.bfloat16()
    index = rs_index(args.batch, 1, length, 1, groups=groups, generator=gen)
    dout = torch.randn(args.batch, length, heads, dim, generator=gen)
    leaf = qkv.clone().requires_grad_()

    def forward(fn, packed):
        def run():
            with torch.no_grad():
                fn(*packed.unbind(2), index, window)
        return run

    def cpp(q, k, v, idx, n):
        return rk.window_attention(q, k, v, idx, n, backend="cpp", check_index=False)

    def fb_packed():
        out = rk.window_attention_qkvpacked(leaf, index, window, backend="cpp", check_index=False)
        torch.autograd.grad(out, leaf, dout)

    def fb_views():
        out = rk.window_attention(*leaf.unbind(2), index, window, backend="cpp", check_index=False)
        torch.autograd.grad(out, leaf, dout)

    def fb_torch():
        out = baselines.torch_window_attention(*leaf.unbind(2), index, window)
        torch.autograd.grad(out, leaf, dout)

    fns = {
        "mm fp32": lambda: torch.mm(a, b),
        "mm bf16": lambda: torch.mm(a16, b16),
        "copy": lambda: dst.copy_(src),
        "cpp fwd fp32": forward(cpp, qkv),
        "cpp fwd bf16": forward(cpp, qkv16),
        "torch fwd fp32": forward(baselines.torch_window_attention, qkv),
        "cpp f+b packed": fb_packed,
        "cpp f+b views": fb_views,
        "torch f+b": fb_torch,
    }
    t = interleaved_medians(fns, args.rounds, clock)
    gemm = 2 * 2048 ** 3
    peak32, peak16 = gemm / t["mm fp32"] / 1e9, gemm / t["mm bf16"] / 1e9
    useful = 2 * flops.attention_macs(args.batch, length, heads, dim, window)  # q k^T and P v
    fwd32 = useful / t["cpp fwd fp32"] / 1e9
    ms = {name: 1e3 * s for name, s in t.items()}
    print(f"cpu_roofline: {torch.ops.rsir_ext.cpu_isa()} build, {args.threads} thread(s), batch {args.batch}, "
          f"medians of {args.rounds} interleaved rounds ({'thread CPU time' if args.threads == 1 else 'wall time'})")
    print(f"  roofline: fp32 GEMM {peak32:.0f} GFLOP/s, bf16 GEMM {peak16:.0f} GFLOP/s, "
          f"copy {2 * src.numel() / t['copy'] / 1e9:.1f} GB/s")
    for name in list(fns)[3:]:
        print(f"  {name:16} {ms[name]:8.2f} ms")
    print(f"  fp32 forward: {fwd32:.1f} GFLOP/s = {100 * fwd32 / peak32:.0f}% of the fp32 GEMM peak (target 50%)")
    print(f"  forward x torch: {ms['torch fwd fp32'] / ms['cpp fwd fp32']:.2f}")
    print(f"  forward+backward x torch: packed {ms['torch f+b'] / ms['cpp f+b packed']:.2f}, "
          f"views {ms['torch f+b'] / ms['cpp f+b views']:.2f} (target 4)")
    print(f"  bf16 forward: {ms['cpp fwd fp32'] / ms['cpp fwd bf16']:.2f}x faster than fp32 (target 1.6)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
