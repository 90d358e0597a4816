"""Quick CPU timing of backend 'cpp' against the pure-PyTorch baselines at RSIR-T's stages.

    PYTHONPATH=. python csrc/tests/bench_cpu.py [--threads 2] [--reps 20] [--batch 8] [--cpu-time]

All in one process, medians of --reps runs after warm-up: each candidate back to back
(warm caches), or with --interleave one run of each per round (each run starts with the
others' data in cache; load from other processes hits all alike).
Columns (ms): cpp / torch forward (torch = baselines.torch_window_attention), sdpa-win
(baselines.sdpa_windows on windows gathered beforehand: no gather, no scatter), forward +
backward of cpp through window_attention (q, k, v views of a packed qkv: autograd then
stacks dq, dk, dv), through window_attention_qkvpacked ("f+b p": packed gradient, no
stack), and of torch. Ratios: "x torch" = torch / cpp (higher: cpp faster), "/sdpa" =
cpp / sdpa-win (lower: cpp faster).
"""
import argparse
import statistics
import time

import torch

import rsir_kernels as rk
from rsir_kernels import baselines
from rsir_kernels.samplers import rs_index

STAGES = [("s1 56x56 H4 D16", 56 * 56, 4, 16), ("s2 28x28 H4 D32", 28 * 28, 4, 32),
          ("s3 14x14 H8 D32", 14 * 14, 8, 32), ("s4 7x7 H16 D32", 7 * 7, 16, 32)]


def medians(fns, reps, clock=time.perf_counter, interleave=False):
    """Median ms of each fn: back to back (caches warm with the fn's own data), or
    interleaved (one run of each per round: every run starts after the others evicted its
    data, and load from other processes hits all alike)."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    if interleave:
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    else:
        for name, fn in fns.items():
            for _ in range(reps):
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--interleave", action="store_true",
                    help="one run of each candidate per round (cold caches) instead of back to back")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the thread's CPU time (with --threads 1: robust on a shared machine)")
    args = ap.parse_args()
    if args.cpu_time and args.threads != 1:
        ap.error("--cpu-time needs --threads 1")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    n, groups = 49, 2
    print(f"threads={args.threads} isa={rk.backends.cpp.CPU_ISA} B={args.batch} N={n} G={groups} fp32 "
          f"(median of {args.reps} runs, {'interleaved' if args.interleave else 'back to back'}, ms"
          f"{', thread CPU time' if args.cpu_time else ''})")
    print(f"{'stage':16} {'cpp fwd':>8} {'torch fwd':>9} {'sdpa-win':>8} {'cpp f+b':>8} {'f+b p':>7}"
          f" {'torch f+b':>9} {'x torch':>7} {'/sdpa':>6} {'x torch f+b':>11} {'(packed)':>8}")
    for name, length, heads, dim in STAGES:
        qkv = torch.randn(args.batch, length, 3, heads, dim, generator=gen)
        q, k, v = qkv.unbind(2)
        index = rs_index(args.batch, 1, length, 1, groups=groups, generator=gen)
        qkv_g = qkv.detach().clone().requires_grad_()
        dout = torch.randn(args.batch, length, heads, dim, generator=gen)
        wins = baselines.gather_windows(q, k, v, index, n)

        def fb(fn):
            def run():
                out = fn()
                torch.autograd.grad(out, qkv_g, dout)
            return run

        def no_grad(fn):
            def run():
                with torch.no_grad():
                    fn()
            return run

        fns = {
            "cpp_f": no_grad(lambda: rk.window_attention(q, k, v, index, n, backend="cpp", check_index=False)),
            "torch_f": no_grad(lambda: baselines.torch_window_attention(q, k, v, index, n)),
            "sdpa": no_grad(lambda: baselines.sdpa_windows(*wins)),
            "cpp_fb": fb(lambda: rk.window_attention(*qkv_g.unbind(2), index, n, backend="cpp", check_index=False)),
            "cpp_fbp": fb(lambda: rk.window_attention_qkvpacked(qkv_g, index, n, backend="cpp", check_index=False)),
            "torch_fb": fb(lambda: baselines.torch_window_attention(*qkv_g.unbind(2), index, n)),
        }
        t = medians(fns, args.reps, clock, args.interleave)
        print(f"{name:16} {t['cpp_f']:8.2f} {t['torch_f']:9.2f} {t['sdpa']:8.2f} {t['cpp_fb']:8.2f}"
              f" {t['cpp_fbp']:7.2f} {t['torch_fb']:9.2f} {t['torch_f'] / t['cpp_f']:7.2f}"
              f" {t['cpp_f'] / t['sdpa']:6.2f} {t['torch_fb'] / t['cpp_fb']:11.2f} {t['torch_fb'] / t['cpp_fbp']:8.2f}")


if __name__ == "__main__":
    main()
