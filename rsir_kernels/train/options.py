"""The run's options after parsing: each checked (`check`, `check_backend`, `check_writable`)
and the defaults that depend on others filled in (`resolve`), all before anything is built or
written, so that a bad one is one line and the saved args say what ran."""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

from ..models.config import MODEL_NAMES, VARIANTS
from . import recipe, resume
from .errors import TrainError

DIGITS_WINDOW = 4  # 32x32 digits: stage maps 8x8, 4x4, 2x2, 1x1; 4x4 windows tile stage 1 into 4
MAX_WORKERS = 8  # data loader processes per rank by default, at most


def check(args: argparse.Namespace) -> None:
    """Every argument on its own, before anything is built or written: TrainError naming it."""
    try:
        import timm  # noqa: F401  (importing it registers the RSIR models)
    except ImportError as e:
        raise TrainError(f"the trainer needs timm (models, optimizer, schedule): pip install 'timm>=1.0' ({e})") from e
    at_least = {"epochs": 1, "batch_size": 1, "grad_accum_steps": 1, "steps_per_epoch": 1, "stop_after": 1, "window_size": 1,
                "threads": 1, "train_items": 1, "val_items": 1, "workers": 0, "img_size": 1, "checkpoint_hist": 0,
                "save_every_steps": 1}
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    for name, low, high in (("drop_path", 0, 1), ("label_smoothing", 0, 1), ("weight_decay", 0, math.inf),
                            ("mixup", 0, math.inf), ("cutmix", 0, math.inf), ("warmup_epochs", 0, math.inf),
                            ("reprob", 0, 1), ("clip_grad", 0, math.inf)):
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise TrainError(f"--{name.replace('_', '-')} must be in [{low}, {high}], got {value}")
    if args.model_ema is not None and not 0 < args.model_ema < 1:
        raise TrainError(f"--model-ema must be a decay in (0, 1), e.g. 0.9998, got {args.model_ema}")
    if args.model_ema is not None and args.fsdp:
        raise TrainError("--model-ema with --fsdp is not supported (the EMA copy would be a full model on every "
                         "rank); use DDP, or leave EMA off as the paper does")
    for name in ("lr", "save_every_minutes"):
        value = getattr(args, name)
        if value is not None and not 0 < value < math.inf:
            raise TrainError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
    if args.model not in MODEL_NAMES:
        raise TrainError(f"--model {args.model!r} is not a registered RSIR model; choose one of {', '.join(MODEL_NAMES)}")
    if args.data not in ("digits", "fake") and not os.path.isdir(args.data):
        raise TrainError(f"--data {args.data}: no such folder (expected 'digits', 'fake' or an ImageFolder tree)")
    args.data = resume.normalised_data(args.data)
    if args.overwrite and args.resume:
        raise TrainError("--overwrite starts the run afresh, --resume continues it: give one of them")
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise TrainError(f"--output {args.output}: a file, not a folder")
    output = args.output = _output_folder(args)
    if not args.overwrite and os.path.isdir(output) and resume.holds_run(output) and not (
            args.resume and os.path.samefile(output, os.path.dirname(os.path.abspath(args.resume)))):
        raise TrainError(f"--output {output} holds a run (last.pt, metrics.jsonl): continue it with --resume "
                         f"{os.path.join(output, 'last.pt')} (or --resume auto), or replace it with --overwrite")


def check_writable(output: str) -> None:
    """--output can take files: created (as the run would) and a probe file written and removed,
    so a read-only or foreign folder is one line before anything is built."""
    try:
        os.makedirs(output, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"--output {output}: not writable ({e.strerror or e})") from e


def check_backend(backend: str, device: torch.device) -> None:
    """--backend names a backend available on this run's device; TrainError otherwise."""
    from ..ops import available_backends
    backends = available_backends()
    if backend != "auto" and backend not in backends:
        raise TrainError(f"--backend {backend!r}: choose auto, {', '.join(backends)}")
    if backend != "auto" and not backends[backend].available:
        raise TrainError(f"--backend {backend}: not available here ({backends[backend].reason})")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError(f"--backend triton runs on CUDA devices, this run's is {device} (or set TRITON_INTERPRET=1)")


def resolve(args: argparse.Namespace, world) -> None:
    """Fills the defaults that depend on other arguments, so that the saved args say what ran."""
    args.recipe_skipped = recipe.resolve(args)
    if args.workers is None:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.workers = max(1, min(MAX_WORKERS, (os.cpu_count() or 1) // ranks)) if args.data not in ("digits", "fake") else 0
    if args.window_size is None:
        args.window_size = DIGITS_WINDOW if args.data == "digits" else VARIANTS[args.model].config.window_size
    if getattr(args, "best_metric", None) is None:  # one column for the whole run, kept by a resume
        args.best_metric = "val_top1_ema" if args.model_ema is not None else "val_top1"
    args.lr = recipe.scaled_lr(args.lr, args.batch_size)
    args.warmup_epochs = recipe.warmup_epochs(args.warmup_epochs, args.epochs)
    batch_per_rank = args.batch_size // world.world_size
    if batch_per_rank % args.grad_accum_steps:
        raise TrainError(f"--grad-accum-steps {args.grad_accum_steps} must divide each rank's batch, "
                         f"{batch_per_rank} (--batch-size {args.batch_size} over {world.world_size} ranks)")
    micro = batch_per_rank // args.grad_accum_steps
    if (args.mixup > 0 or args.cutmix > 0) and micro % 2:
        raise TrainError(f"--mixup/--cutmix pair images within a rank's micro-batch: it must be even, got "
                         f"{micro} (--batch-size {args.batch_size} over {world.world_size} ranks and "
                         f"{args.grad_accum_steps} accumulation steps)")


def _output_folder(args) -> str:
    """--output, else --resume's folder, else a fresh runs/<time>-<model>-<data>."""
    if args.output:
        return args.output
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    stem = os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}-{os.path.basename(args.data.rstrip('/'))}")
    path, n = stem, 1
    while os.path.exists(path):
        path, n = f"{stem}-{n}", n + 1
    return path
