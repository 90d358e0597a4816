#!/usr/bin/env python3
"""Dense tasks at the paper's sizes: backbone + FPN of rsir_tiny (per backend) and Swin-T.

Rows, built alike (common/dense_models.py): rsir_fpn_backbone("rsir_tiny", backend=...) for
each backend, and timm's swin_tiny_patch4_window7_224 (features_only, SDPA attention) behind
the same per-stage LayerNorm and torchvision FPN; and the bodies alone (backbone + its output
norms, no FPN: rows "swin body" and "<first backend> body"), the part that differs between the
models (the FPN's cost is the same for both). Per image size, batch 1, the rows interleaved (one
call of each per round, common/timing.Timer):

- forward: eval(), torch.no_grad()
- forward+backward: train(), sum of the output maps' means, backward (no optimizer)
- peak memory of that step above what was held before it (common/dense_measure.peak_memory:
  CPU resident high-water mark, CUDA max_memory_allocated), taken in its first timed call
- attention share: one profiled call of each (the warm-up): the attention ops' self time /
  all ops' self time, forward and forward+backward, and the top ops by self time
- time ratios rsir row / swin and rsir row / reference from the same run's medians (a body row
  against the swin body row)

and FLOPs (FlopCounterMode, forward, multiply-adds = FLOPs / 2) of each model at the paper's
FLOP sizes (800x1280 for Table 1, 512x2048 for Table 6). Writes <out>/dense_<device>.json
after every size and prints the table.

    python benchmarks/bench_dense.py                       # = make bench-dense (CPU: ~30 min on 2 cores)
    python benchmarks/bench_dense.py --device cuda --backends triton,reference
    python benchmarks/bench_dense.py --quick --out /tmp/d  # small sizes, 1 repeat: a smoke test
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import dense_measure as dm
from benchmarks.common.cli import DTYPES, OUT, resolve_device, start_run
from benchmarks.common.dense_models import BODY, attention_ops, build, describe
from benchmarks.common.dense_report import DEFINITIONS, PAPER_MACS, add_ratios, format_dense_table
from benchmarks.common.measure import summarize
from benchmarks.common.report import args_record, write_json
from benchmarks.common.run_info import environment, load_average
from benchmarks.common.timing import Timer, TimingPolicy


def _sizes(text):
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="float32", help="float32, or bfloat16/float16 autocast")
    p.add_argument("--backends", "--backend", default=None,
                   help="rsir_tiny backends, comma list (default CPU: cpp,reference; CUDA: triton,cpp,reference); "
                        "`reference` is always added (the ratios' denominator)")
    p.add_argument("--sizes", default=None, help="HxW list to time (default 800x1333,512x2048)")
    p.add_argument("--flop-sizes", default=None, help="HxW list to count FLOPs at (default 800x1280,512x2048)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default CPU 2, CUDA 10; --quick 1)")
    p.add_argument("--flops-only", action="store_true", help="count FLOPs, time nothing: dense_<device>_flops.json")
    p.add_argument("--quick", action="store_true", help="32x48, 1 repeat: a smoke test")
    p.add_argument("--no-body", dest="body", action="store_false",
                   help="leave out the body-only rows (swin body, <first backend> body)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(OUT),
                   help="default benchmarks/out (ignored by git); benchmarks/results: the committed figures")
    args = p.parse_args(argv)
    args.device = resolve_device(p, args.device)
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    gpu = args.device.type == "cuda"
    args.sizes = _sizes(args.sizes or ("32x48" if args.quick else "800x1333,512x2048"))
    args.flop_sizes = _sizes(args.flop_sizes or ("32x48" if args.quick else "800x1280,512x2048"))
    args.sizes = [] if args.flops_only else args.sizes
    args.repeats = args.repeats or (1 if args.quick else (10 if gpu else 2))
    names = (args.backends or ("triton,cpp,reference" if gpu else "cpp,reference")).split(",")
    args.backends = [n.strip() for n in names if n.strip()] + ["reference"]
    args.backends = list(dict.fromkeys(args.backends))
    return args


def available(names, device):
    from rsir_kernels import backends
    chosen, skipped = [], {}
    for n in names:
        b = backends.get(n)
        why = b.unavailable or (None if device.type in b.priority else f"no {device.type} kernels")
        (skipped.__setitem__(n, why) if why else chosen.append(n))
    return chosen, skipped


def step_fns(model, images, autocast):
    def forward():
        with torch.no_grad(), autocast:
            return model.eval()(images)

    def train_step():
        model.train()
        with autocast:
            loss = sum(m.float().mean() for m in model(images).values())
        loss.backward()
        model.zero_grad(set_to_none=True)
    return forward, train_step


def bench_size(height, width, names, args, device, dtype) -> dict:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    images = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(args.seed)).to(device)
    rows = ["swin"] + names + ([f"swin {BODY}", f"{names[0]} {BODY}"] if args.body else [])
    models = {n: build(n, height, width, device, args.seed) for n in rows}
    fns = {n: step_fns(models[n], images, autocast) for n in rows}
    timer = Timer(device, TimingPolicy(warmup=0, min_reps=args.repeats, max_reps=args.repeats, budget_s=0.0))
    out = {n: {"row": n, "model": describe(n)} for n in rows}
    # warm-up = the profiled call (one-time costs land there, not in the timed rounds)
    for n in rows:
        out[n]["profile_forward"] = dm.attention_share(fns[n][0], *attention_ops(n), device)
    for n, t in zip(rows, timer.interleaved([fns[n][0] for n in rows])):
        out[n]["forward_ms"] = summarize(t)
    for n in rows:
        out[n]["profile_forward_backward"] = dm.attention_share(fns[n][1], *attention_ops(n), device)
    first = {}

    def with_peak(n):
        def run():    # the first timed call also measures the peak (reading /proc or two counters)
            if n in first:
                return fns[n][1]()
            first[n] = dm.peak_memory(fns[n][1], device)
        return run
    for n, t in zip(rows, timer.interleaved([with_peak(n) for n in rows])):
        out[n]["forward_backward_ms"] = summarize(t)
        out[n]["train_peak"] = first[n]
    result = {"height": height, "width": width, "batch": 1, "rows": list(out.values())}
    add_ratios(result["rows"])
    return result


def flops_at(height, width, names, device) -> dict:
    images = torch.randn(1, 3, height, width, device=device)
    counts = {n: dm.count_flops(build(n, height, width, device, sdpa=False), images) for n in ("swin", names[0])}
    return {"height": height, "width": width, "counts": counts,
            "paper_macs": PAPER_MACS.get((height, width))}


def main(argv=None) -> int:
    if sys.platform.startswith("linux") and any(os.environ.get(k) != v for k, v in dm.MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **dm.MALLOC_ENV})  # dense_measure
    args = parse_args(argv)
    device, dtype = start_run(args)
    names, skipped = available(args.backends, device)
    report = environment(device)
    report.update(benchmark="bench_dense", args=args_record(args), skipped_backends=skipped,
                  command=" ".join([Path(sys.executable).name, *sys.argv]),
                  timing={"statistic": "median of the timed rounds (min and max also stored)",
                          "rounds": args.repeats, "order": "rows interleaved, one call each per round"},
                  definitions=DEFINITIONS, sizes=[], flops=[])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"dense_{device.type}{'' if args.dtype == 'float32' else '_' + args.dtype}"
                      f"{'_flops' if args.flops_only else ''}.json")
    print(f"bench_dense: swin + rsir_tiny[{', '.join(names)}] at {', '.join(f'{h}x{w}' for h, w in args.sizes)} "
          f"on {report['device']['name']}, {args.repeats} round(s)", flush=True)
    t0 = time.perf_counter()
    for h, w in args.flop_sizes:
        report["flops"].append(flops_at(h, w, names, device))
        write_json(report, path)
    for h, w in args.sizes:
        report["sizes"].append(bench_size(h, w, names, args, device, dtype))
        report["elapsed_s"] = time.perf_counter() - t0
        report["host"]["load_average_end"] = load_average()
        write_json(report, path)
        print(f"  {h}x{w} done ({report['elapsed_s']:.0f} s)", file=sys.stderr, flush=True)
    print(format_dense_table(report))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
