#!/usr/bin/env python3
"""RSIR-T end to end: training step and inference images/s with each window_attention backend.

For every rsir_kernels backend that is available and can run the model's attention inputs
(`reference` always), on the same weights and images:

- train: forward + cross-entropy + backward + AdamW step (bf16 autocast on GPU)
- infer: forward under torch.inference_mode() (bf16 autocast on GPU), model.eval()
- saved: bytes autograd saves for backward per image during a training forward
  (measure.SavedTensorsCounter: unique storages), and peak CUDA memory of a training step
- check: the logits of a forward with each backend against `reference` (same RS-Win draws)
- modes (--modes): eager (all of the above), and a training step of torch.compile(model)
  ("compile") and torch.compile(model, mode="reduce-overhead") (Inductor + CUDA graphs, GPU
  only), for every backend, `reference` included: compiled, Inductor fuses the reference's
  gather and scatter, the baseline a user would otherwise pick. Compiled rows are checked
  against the eager model first (common/model_measure.bench_compiled).

Defaults: GPU 224x224 batch 64 bf16, all three modes; CPU 224x224 batch 2 with few
iterations, eager only (about a minute; compiling RSIR-T on a small CPU takes minutes).
--quick: 64x64 batch 1 (a smoke test). Writes <out>/bench_model_<device>_<dtype>.json, after
every row (a run stopped by a time limit keeps what it measured).

    python benchmarks/bench_model.py
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from benchmarks.common.cli import DTYPES, OUT, resolve_device, start_run
from benchmarks.common.model_measure import (MODES, attention_inputs, bench_backend, bench_compiled, resolve_modes,
                                             select_backends)
from benchmarks.common.progress import Progress
from benchmarks.common.report import MODEL_DEFINITIONS, args_record, format_model_table, model_output_stem, write_json
from benchmarks.common.run_info import environment, load_average
from benchmarks.common.timing import Timer, TimingPolicy

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="autocast dtype on GPU (default bfloat16); CPU: float32")
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 2 on CPU (1 with --quick)")
    p.add_argument("--image", type=int, default=None, help="default 224 (64 with --quick)")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny")
    p.add_argument("--backends", default=None, help="comma list (default: every available one that runs)")
    p.add_argument("--quick", action="store_true", help="64x64, batch 1, 2 repeats: a smoke test")
    p.add_argument("--recompute-qkv", action="store_true",
                   help="build the models with RSIRAttention(recompute_qkv=True): less saved memory, more compute")
    p.add_argument("--modes", default=None,
                   help=f"comma list of {', '.join(MODES)} (default: all on GPU, eager on CPU)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--out", default=str(OUT),
                   help="default benchmarks/out (ignored by git); benchmarks/results: the committed figures")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.device = resolve_device(p, args.device)
    gpu = args.device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    args.image = args.image or (64 if args.quick else 224)
    if args.image % 32:
        p.error("--image must be divisible by 32")
    args.batch = args.batch or (1 if args.quick else (64 if gpu else 2))
    args.modes = [m.strip() for m in (args.modes or ("eager,compile,reduce-overhead" if gpu else "eager")).split(",")
                  if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes must be a comma list of {', '.join(MODES)}")
    args.backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def timing_policy(args) -> TimingPolicy:
    if args.quick:
        policy = TimingPolicy(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    elif args.device.type == "cuda":
        policy = TimingPolicy(warmup=3, min_reps=10, max_reps=30, budget_s=2.0)
    else:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=5, budget_s=5.0)
    if args.repeats:
        policy.max_reps, policy.min_reps = args.repeats, min(policy.min_reps, args.repeats)
    return policy


def add_speedups(rows: list) -> None:
    """Per row: train (and infer) speedup over `reference` in the same mode, and train speedup
    over the fastest `reference` training step of any mode (compiled, usually)."""
    ref = {r["mode"]: r for r in rows if r["backend"] == "reference" and "train_step_ms" in r}
    best = min((r["train_step_ms"]["median"] for r in ref.values()), default=None)
    for r in rows:
        if "train_step_ms" not in r:
            continue
        mine = r["train_step_ms"]["median"]
        same = ref.get(r["mode"])
        r["train_speedup_vs_reference"] = same["train_step_ms"]["median"] / mine if same else None
        r["train_speedup_vs_best_reference"] = best / mine if best else None
        if "infer_ms" in r and same and "infer_ms" in same:
            r["infer_speedup_vs_reference"] = same["infer_ms"]["median"] / r["infer_ms"]["median"]


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = start_run(args)
    policy = timing_policy(args)
    timer = Timer(device, policy)

    qs, window_size = attention_inputs(args.model, args.image, device, dtype)
    names, skipped = select_backends(args.backends, qs, window_size)
    if "reference" not in names:
        names.insert(0, "reference")
    report = environment(device)
    report.update(benchmark="bench_model", args=args_record(args),
                  timing={"policy": dataclasses.asdict(policy)}, skipped_backends=skipped,
                  definitions=MODEL_DEFINITIONS)
    print(f"bench_model: RSIR-{'T' if args.model == 'tiny' else 'B'} {args.image}x{args.image} batch {args.batch} "
          f"{args.dtype} on {report['device']['name']} ({device}); backends {', '.join(names)}"
          + ("; recompute_qkv" if args.recompute_qkv else ""), flush=True)
    modes, skipped_modes = resolve_modes(args.modes, device)
    report["modes"], report["skipped_modes"] = modes, skipped_modes
    if any(m != "eager" for m in modes):
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True   # compiled RS-Win draws equal eager ones (the check)
        report["timing"]["compiled"] = "torch._inductor.config.fallback_random = True"
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image, args.image, generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    jobs = [(mode, name) for mode in modes for name in names]
    progress = Progress(sum(3 if m == "eager" else 1 for m, _ in jobs), enabled=not args.no_progress)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = model_output_stem(device, args.dtype, args.model) + ("_recompute_qkv" if args.recompute_qkv else "")
    path = out_dir / (stem + ".json")
    report["rows"] = rows = []
    t_start = time.perf_counter()
    try:
        for mode, name in jobs:
            try:
                if mode == "eager":
                    rows.append(bench_backend(name, args, device, dtype, images, labels, timer, progress))
                else:
                    rows.append(bench_compiled(name, mode, args, device, dtype, images, labels, timer))
                    progress.step(f"{name} {mode}")
            except Exception as e:  # noqa: BLE001 - a backend that breaks is reported, the others still run
                rows.append({"backend": name, "mode": mode, "check_passed": False,
                             "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
            add_speedups(rows)
            report["elapsed_s"] = time.perf_counter() - t_start
            write_json(report, path)
    finally:
        progress.close()
    report["host"]["load_average_end"] = load_average()
    write_json(report, path)
    print(format_model_table(rows, {**skipped, **skipped_modes}, gpu=device.type == "cuda"))
    print(f"wrote {path} ({report['elapsed_s']:.1f} s)")
    return 0 if all(r.get("check_passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
