#!/usr/bin/env python3
"""Window attention benchmark (the project's main job: `make bench`).

For each stage of RSIR-T (or RSIR-B with --model base) at 224x224, window 7x7 (N = 49),
G = 2 (RS-Win order and IR-Win order stacked), it times every available backend of
rsir_kernels (through rsir_kernels.ops.window_attention) and the baselines of
docs/design.md section 5 on the same inputs, after checking each one's output and gradient against
rsir_kernels.reference:

    paper         Algorithms 1/2 of the paper literally (baselines.paper_rsir_attention)
    torch         the best pure-PyTorch path (baselines.torch_window_attention)
    sdpa-windows  SDPA alone on already-gathered windows (baselines.sdpa_windows): the floor

Prints a table, writes <out>/bench_attn_<device>_<dtype>[_base].json and a .png of the
speedups over `torch`; <out> is benchmarks/out/ by default, which git ignores (`--out
benchmarks/results`, or `make bench-refresh`, refreshes the committed figures). On a GPU every
row also gets its device time (CUDA-graph replays: kernels against kernels, without the host
time that bounds small stages). docs/performance.md explains every column.

    python benchmarks/bench_attn.py                 # CPU fp32 batch 8, or GPU bf16 batch 64
    python benchmarks/bench_attn.py --out benchmarks/results   # = make bench-refresh
    python benchmarks/bench_attn.py --quick --out /tmp/b   # a few seconds (CI smoke test)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.attn_measure import bench_shape
from benchmarks.common.cases import BASELINES, WINDOW, select_backends, stage_shapes
from benchmarks.common.cli import DTYPES, OUT, resolve_device, start_run
from benchmarks.common.progress import Progress
from benchmarks.common.report import (ATTN_DEFINITIONS, ATTN_TIMING_NOTES, args_record, format_table,
                    output_stem, write_json, write_plot)
from benchmarks.common.run_info import environment, load_average
from benchmarks.common.timing import Timer, TimingPolicy, copy_bandwidth, device_timer


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32/bfloat16/float16/float64 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU (2 with --quick)")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny", help="RSIR-T or RSIR-B stage shapes")
    p.add_argument("--image", type=int, default=224, help="image side (default 224)")
    p.add_argument("--stages", default=None, help="comma list of stages 1-4 (default all; --quick: 1,4)")
    p.add_argument("--backends", default=None,
                   help="comma list of rsir_kernels backends (default: every available one that can run the inputs)")
    p.add_argument("--quick", action="store_true", help="a few seconds in all: small batch, stages 1 and 4, few repeats")
    p.add_argument("--repeats", type=int, default=None, help="maximum timed repeats per measurement")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement after the minimum repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on CPU (default: torch's; 1 is steadier on a shared machine)")
    p.add_argument("--out", default=str(OUT), help="folder for the JSON and PNG (default benchmarks/out, ignored "
                   "by git; benchmarks/results refreshes the committed figures: make bench-refresh)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.device = resolve_device(p, args.device)
    gpu = args.device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    if args.batch is None:
        args.batch = 2 if args.quick else (64 if gpu else 8)
    if args.stages is None:
        args.stages = "1,4" if args.quick else "1,2,3,4"
    try:
        args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        p.error("--stages must be a comma list of integers 1..4")
    if not args.stages or any(s < 1 or s > 4 for s in args.stages):
        p.error("--stages must be a comma list of integers 1..4")
    args.backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def timing_policy(args) -> TimingPolicy:
    gpu = args.device.type == "cuda"
    if args.quick:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=10, budget_s=0.05)
    elif gpu:
        policy = TimingPolicy(warmup=5, min_reps=10, max_reps=200, budget_s=0.3)
    else:
        policy = TimingPolicy(warmup=3, min_reps=10, max_reps=100, budget_s=2.0)
    if args.repeats is not None:
        policy.max_reps = max(1, args.repeats)
        policy.min_reps = min(policy.min_reps, policy.max_reps)
    if args.budget is not None:
        policy.budget_s = args.budget
    return policy

def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = start_run(args)
    torch.manual_seed(args.seed)
    policy = timing_policy(args)
    timer = Timer(device, policy)
    dev_timer = device_timer(device, policy)
    shapes = [s for s in stage_shapes(args.model, args.image) if s.stage in args.stages]
    for s in shapes:
        if s.height % WINDOW or s.width % WINDOW:
            raise SystemExit(f"stage {s.stage}: {s.height}x{s.width} is not divisible by {WINDOW} "
                             "(the paper baseline needs Swin's window_partition)")
    report = environment(device)
    report.update(benchmark="bench_attn", args=args_record(args),
                  timing={"policy": dataclasses.asdict(policy),
                          "method": "CUDA events per call after an L2 flush" if device.type == "cuda"
                          else "time.perf_counter per call",
                          "device_time": "CUDA-graph replay of each call between CUDA events after an "
                                         "L2 flush, rows interleaved" if dev_timer.available
                          else "n/a: no device apart from the host (the eager times are the device times)",
                          **ATTN_TIMING_NOTES},
                  definitions=ATTN_DEFINITIONS)
    t_start = time.perf_counter()
    print(f"bench_attn: {report['device']['name']} ({device}), {args.dtype}, batch {args.batch}, "
          f"RSIR-{'T' if args.model == 'tiny' else 'B'} stages {','.join(map(str, args.stages))}, "
          f"torch {torch.__version__}, commit {report['git']['commit'][:12]}", flush=True)
    copy = copy_bandwidth(device, timer)
    report["copy_bandwidth"] = copy
    if copy:
        print(f"device-to-device copy: {copy['bytes_per_s'] / 1e9:.0f} GB/s (read + write)", flush=True)
    copy_bw = copy["bytes_per_s"] if copy else None
    # steps per shape: a check per row, eager fwd and fwd+bwd, device fwd and fwd+bwd, the index check
    n_rows = [len(select_backends(args.backends, torch.empty(1, s.length, s.heads, s.head_dim, device=device,
                                                             dtype=dtype))[0]) + len(BASELINES) for s in shapes]
    progress = Progress(sum(n + 5 for n in n_rows), enabled=not args.no_progress)
    report["shapes"] = []
    try:
        for s in shapes:
            report["shapes"].append(bench_shape(s, args, device, dtype, timer, progress, copy_bw, dev_timer))
    finally:
        progress.close()
    report["elapsed_s"] = time.perf_counter() - t_start
    report["host"]["load_average_end"] = load_average()
    failed = [(s["stage"], r["name"]) for s in report["shapes"] for r in s["rows"] if r["status"] != "ok"]
    report["all_checks_passed"] = not failed

    report["table"] = format_table(report)
    print()
    print(report["table"])
    load = report["host"]["load_average_end"]
    if device.type == "cpu" and load and os.cpu_count() and load[0] > os.cpu_count() + 0.5:
        print(f"note: load average {load[0]:.1f} on {os.cpu_count()} cores at the end: other processes "
              "shared the CPU, CPU timings are noisy (compare ratios, re-run on an idle machine)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(device, dtype, args.model)
    json_path = out_dir / f"{stem}.json"
    write_json(report, json_path)
    note = write_plot(report, out_dir / f"{stem}.png")
    print(f"wrote {json_path}" + (f"; {note}" if note else f" and {out_dir / (stem + '.png')}")
          + f" ({report['elapsed_s']:.1f} s)")
    if failed:
        print("FAILED checks: " + ", ".join(f"stage {s} {n}" for s, n in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
