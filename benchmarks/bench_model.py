#!/usr/bin/env python3
"""RSIR-T end to end: training step and inference images/s with each window_attention backend.

For every rsir_kernels backend that is available and can run the model's attention inputs
(`reference` always), on the same weights and images:

- train: forward + cross-entropy + backward + AdamW step (bf16 autocast on GPU)
- infer: forward under torch.inference_mode() (bf16 autocast on GPU), model.eval()
- saved: bytes autograd saves for backward per image during a training forward
  (measure.SavedTensorsCounter: unique storages), and peak CUDA memory of a training step
- check: the logits of a forward with each backend against `reference` (same RS-Win draws)

Defaults: GPU 224x224 batch 64 bf16; CPU 224x224 batch 2 with few iterations (about a
minute). --quick: 64x64 batch 1 (a smoke test). Writes <out>/bench_model_<device>_<dtype>.json.

    PYTHONPATH=. python benchmarks/bench_model.py
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0 if _p == str(HERE) else len(sys.path), _p)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import measure  # noqa: E402
from bench_attn import DTYPES, Progress, Timer, TimingPolicy, environment, load_average  # noqa: E402
from rsir_kernels import backends  # noqa: E402
from rsir_kernels.models import rsir_base, rsir_tiny  # noqa: E402
from rsir_kernels.modules import RSIRAttention  # noqa: E402


def attention_inputs(model_name: str, image: int, device, dtype):
    """One q-like tensor per stage, to ask each backend whether it can run the model."""
    model_fn = {"tiny": rsir_tiny, "base": rsir_base}[model_name]
    config = model_fn().config
    out = []
    for i, (dim, heads) in enumerate(zip(config.stage_dims(), config.num_heads)):
        side = image // (4 * 2 ** i)
        out.append(torch.empty(1, side * side, heads, dim // heads, device=device, dtype=dtype))
    return out, config.window_size ** 2


def select_backends(requested, qs, window_size):
    chosen, skipped = [], {}
    for name in backends.names():
        if requested is not None and name not in requested:
            continue
        b = backends.get(name)
        reason = b.unavailable or next((r for r in (b.cannot_run(q, window_size) for q in qs) if r), None)
        if reason is None and "triton" in name and qs[0].device.type == "cpu":
            import os
            if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                reason = "TRITON_INTERPRET=1: the interpreter is never benchmarked"
        (skipped.__setitem__(name, reason) if reason else chosen.append(name))
    return chosen, skipped


def build(model_name, backend, device, seed):
    """The same weights and the same RS-Win generator seed for every backend."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    model_fn = {"tiny": rsir_tiny, "base": rsir_base}[model_name]
    return model_fn(backend=backend, generator=generator).to(device), generator


def bench_backend(name, args, device, dtype, images, labels, timer, progress) -> dict:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    row = {"backend": name}
    model, generator = build(args.model, name, device, args.seed)
    batch = images.shape[0]

    # correctness: logits vs the reference backend, same weights, same token orders. The
    # orders are recorded in the reference run and replayed: IR-Win sorts tokens by their
    # channel mean, so rounding differences of a few ulps between backends could otherwise
    # swap near-tied tokens between windows and change the logits for no fault of the kernel.
    model.eval()
    attention = [m for m in model.modules() if isinstance(m, RSIRAttention)]
    orders = {id(m): [] for m in attention}
    with torch.inference_mode(), autocast:
        generator.manual_seed(args.seed + 1)
        for m in attention:
            m.backend = "reference"
            m.token_order = (lambda x, h, w, m=m, f=m.token_order: orders[id(m)].append(f(x, h, w)) or orders[id(m)][-1])
        expected = model(images).float()
        for m in attention:
            m.backend = name
            m.token_order = (lambda x, h, w, it=iter(orders[id(m)]): next(it))
        logits = model(images).float()
    for m in attention:
        del m.token_order  # back to the method: fresh orders at every forward
    err = float((logits - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    # A sanity check of the whole model (bench_attn.py checks the op precisely): fp32 1e-4;
    # under bf16/fp16 autocast the backends round differently inside 22 blocks: 1e-1.
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-1
    row["logits_rel_err_vs_reference"] = err
    row["check_passed"] = bool(err <= tol and torch.isfinite(logits).all())
    progress.step(f"{name} check")

    # bytes saved for backward in a training forward
    model.train()
    params = list(model.parameters())
    with autocast:
        total, activations = measure.saved_bytes(lambda x: nn.functional.cross_entropy(model(x), labels), images,
                                                 exclude=params + [images])
    row["saved_bytes_total"] = total
    row["saved_bytes_per_image"] = activations / batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        train_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step()
        torch.cuda.synchronize()
        row["train_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["train_peak_above_start_bytes"] = row["train_peak_bytes"] - before
    row["train_step_ms"] = measure.summarize(timer(train_step))
    row["train_images_per_s"] = batch / (row["train_step_ms"]["median"] / 1e3)
    progress.step(f"{name} train")

    model.eval()

    def infer():
        with torch.inference_mode(), autocast:
            return model(images)
    row["infer_ms"] = measure.summarize(timer(infer))
    row["infer_images_per_s"] = batch / (row["infer_ms"]["median"] / 1e3)
    progress.step(f"{name} infer")
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, help="autocast dtype on GPU (default bfloat16); CPU: float32")
    p.add_argument("--batch", type=int, default=None, help="default 64 on GPU, 2 on CPU (1 with --quick)")
    p.add_argument("--image", type=int, default=None, help="default 224 (64 with --quick)")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny")
    p.add_argument("--backends", default=None, help="comma list (default: every available one that runs)")
    p.add_argument("--quick", action="store_true", help="64x64, batch 1, 2 repeats: a smoke test")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU; default: torch's)")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    args.image = args.image or (64 if args.quick else 224)
    if args.image % 32:
        p.error("--image must be divisible by 32")
    args.batch = args.batch or (1 if args.quick else (64 if gpu else 2))
    args.backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    args.dtype = str(dtype).replace("torch.", "")
    if args.quick:
        policy = TimingPolicy(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    elif device.type == "cuda":
        policy = TimingPolicy(warmup=3, min_reps=10, max_reps=30, budget_s=2.0)
    else:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=5, budget_s=5.0)
    if args.repeats:
        policy.max_reps, policy.min_reps = args.repeats, min(policy.min_reps, args.repeats)
    timer = Timer(device, policy)

    qs, window_size = attention_inputs(args.model, args.image, device, dtype)
    names, skipped = select_backends(args.backends, qs, window_size)
    if "reference" not in names:
        names.insert(0, "reference")
    report = environment(device)
    report.update(benchmark="bench_model",
                  args={k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
                  timing={"policy": dataclasses.asdict(policy)}, skipped_backends=skipped,
                  definitions={"saved_bytes_per_image": "unique storages saved for backward in one training "
                                                        "forward (incl. loss), leaving out the parameters and the "
                                                        "images, / batch (under autocast the low-precision copies "
                                                        "of the weights count)",
                               "saved_bytes_total": "the same with parameters and images, for the whole batch",
                               "train_step": "forward + cross-entropy + backward + AdamW step + zero_grad",
                               "infer": "forward under inference_mode, eval()",
                               "speedup_vs_reference": "reference median / backend median"})
    print(f"bench_model: RSIR-{'T' if args.model == 'tiny' else 'B'} {args.image}x{args.image} batch {args.batch} "
          f"{args.dtype} on {report['device']['name']} ({device}); backends {', '.join(names)}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch, 3, args.image, args.image, generator=gen).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen).to(device)
    progress = Progress(3 * len(names), enabled=not args.no_progress)
    rows = []
    t_start = time.perf_counter()
    try:
        for name in names:
            try:
                rows.append(bench_backend(name, args, device, dtype, images, labels, timer, progress))
            except Exception as e:  # noqa: BLE001 - a backend that breaks is reported, the others still run
                rows.append({"backend": name, "check_passed": False, "error": f"{type(e).__name__}: {e}"})
    finally:
        progress.close()
    ref = next((r for r in rows if r["backend"] == "reference" and "train_step_ms" in r), None)
    for r in rows:
        if ref and "train_step_ms" in r:
            r["train_speedup_vs_reference"] = ref["train_step_ms"]["median"] / r["train_step_ms"]["median"]
            r["infer_speedup_vs_reference"] = ref["infer_ms"]["median"] / r["infer_ms"]["median"]
    report["rows"] = rows
    report["elapsed_s"] = time.perf_counter() - t_start
    report["host"]["load_average_end"] = load_average()

    gpu = device.type == "cuda"
    head = f"{'backend':<10} {'train ms':>9} {'img/s':>8} {'x ref':>6} {'infer ms':>9} {'img/s':>8} {'x ref':>6} " \
           f"{'saved MB/img':>12}" + (f" {'peak MB':>8}" if gpu else "") + "  check"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "train_step_ms" not in r:
            print(f"{r['backend']:<10} FAILED: {r.get('error', '')}")
            continue
        line = (f"{r['backend']:<10} {r['train_step_ms']['median']:9.1f} {r['train_images_per_s']:8.1f} "
                f"{r.get('train_speedup_vs_reference', float('nan')):6.2f} {r['infer_ms']['median']:9.1f} "
                f"{r['infer_images_per_s']:8.1f} {r.get('infer_speedup_vs_reference', float('nan')):6.2f} "
                f"{r['saved_bytes_per_image'] / 2 ** 20:12.1f}")
        if gpu:
            line += f" {r.get('train_peak_above_start_bytes', 0) / 2 ** 20:8.0f}"
        line += f"  {'ok' if r['check_passed'] else 'FAILED'} (logits rel err {r['logits_rel_err_vs_reference']:.1e})"
        print(line)
    for name, why in skipped.items():
        print(f"    {name} not run: {why}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"bench_model_{device.type}_{args.dtype}" + ("" if args.model == "tiny" else f"_{args.model}")
                      + ".json")
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"wrote {path} ({report['elapsed_s']:.1f} s)")
    return 0 if all(r.get("check_passed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
