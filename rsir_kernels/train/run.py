"""The training run: arguments -> data, model, recipe, (resumed) state -> epochs -> report."""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed
from torch import nn

from . import checkpoint, data as datasets, distributed, loop, recipe, report
from .errors import TrainError
from .model import MODEL_NAMES, create_model, pretrained_cfg

DIGITS_WINDOW = 4  # 32x32 digits: stage maps 8x8, 4x4, 2x2, 1x1; 4x4 windows tile stage 1 into 4
# Arguments a resumed run must share with the checkpoint (others, e.g. --epochs, may change).
RESUME_MUST_MATCH = ("data", "model", "batch_size", "seed", "window_size", "train_items", "fsdp")


def _check_args(args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.model not in MODEL_NAMES:
        raise TrainError(f"--model {args.model!r} is not a registered RSIR model; choose one of {', '.join(MODEL_NAMES)}")
    if args.steps_per_epoch is not None and args.steps_per_epoch < 1:
        raise TrainError(f"--steps-per-epoch must be >= 1, got {args.steps_per_epoch}")
    if args.data not in ("digits", "fake") and not os.path.isdir(args.data):
        raise TrainError(f"--data {args.data}: no such folder (expected 'digits', 'fake' or an ImageFolder tree)")


def _build(args, world) -> tuple:
    """(model on its device, Data), the model initialised from args.seed (equal on every rank)."""
    distributed.seed_all(args.seed)
    common = dict(drop_path_rate=args.drop_path, backend=args.backend, recompute_qkv=args.recompute_qkv)
    if args.data == "digits":
        data = datasets.digits()
        window = args.window_size if args.window_size is not None else DIGITS_WINDOW
        model = create_model(args.model, num_classes=data.num_classes, in_chans=1, window_size=window, **common)
    else:
        if args.data == "fake":
            num_classes = 1000
        else:
            num_classes = len(datasets.image_folder_classes(args.data))
        model = create_model(args.model, num_classes=num_classes, in_chans=3, window_size=args.window_size,
                             **common)
        cfg = pretrained_cfg(model)
        if args.img_size is not None:
            cfg["input_size"] = (3, args.img_size, args.img_size)
        data = (datasets.fake(cfg["input_size"], num_classes) if args.data == "fake"
                else datasets.image_folder(args.data, cfg, auto_augment=args.randaugment))
    data.train = datasets.subset(data.train, args.train_items)
    data.val = datasets.subset(data.val, args.val_items)
    if len(data.val) < world.world_size:
        raise TrainError(f"the validation set has {len(data.val)} items, fewer than the {world.world_size} ranks")
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TrainError(f"--grad-checkpointing: {args.model} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model = model.to(world.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, data


def _output_folder(args) -> str:
    if args.output:
        return args.output
    if args.resume:
        return os.path.dirname(os.path.abspath(args.resume))
    stem = os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{args.model}-{os.path.basename(args.data.rstrip('/'))}")
    path, n = stem, 1
    while os.path.exists(path):
        path, n = f"{stem}-{n}", n + 1
    return path


def train(args: argparse.Namespace, on_step: Optional[Callable[[int, float, nn.Module], None]] = None) -> dict:
    """Runs the whole training; returns {"output", "metrics" (rows), "model" (the unwrapped
    module, sharded under FSDP2)}. on_step(step, loss, model) runs on every rank after each
    step (model: the trained, wrapped module)."""
    _check_args(args)
    world = distributed.world_from_env(args.batch_size, args.device)
    resumed = checkpoint.load(args.resume) if args.resume else None
    if resumed is not None:
        mismatched = [k for k in RESUME_MUST_MATCH if resumed["args"].get(k) != getattr(args, k)]
        if mismatched:
            raise TrainError(f"--resume {args.resume}: the run had different " + ", ".join(
                f"--{k.replace('_', '-')} ({resumed['args'].get(k)!r}, now {getattr(args, k)!r})" for k in mismatched))
        if len(resumed["rng"]) != world.world_size:
            raise TrainError(f"--resume {args.resume}: written by {len(resumed['rng'])} ranks, this run has "
                             f"{world.world_size} (the RNG streams are per rank)")
    created = distributed.init(world, args.threads)
    try:
        return _train(args, world, resumed, on_step)
    finally:
        distributed.close(created)


def _train(args, world, resumed, on_step) -> dict:
    model, data = _build(args, world)
    if resumed is not None and not args.fsdp:
        model.load_state_dict(resumed["model"])  # before DDP, which broadcasts rank 0's
    wrapped = distributed.wrap(model, world, args.fsdp)
    batch_per_rank = args.batch_size // world.world_size
    train_loader = datasets.train_loader(data.train, batch_per_rank, world.rank, world.world_size, args.seed,
                                         _workers(args))
    val_loader = datasets.eval_loader(data.val, batch_per_rank, world.rank, world.world_size, _workers(args))
    steps_per_epoch = min(len(train_loader), args.steps_per_epoch or len(train_loader))
    if steps_per_epoch == 0:
        raise TrainError(f"the training set has {len(data.train)} items, fewer than one global batch "
                         f"(--batch-size {args.batch_size})")
    lr = recipe.scaled_lr(args.lr, args.batch_size)
    optimizer = recipe.optimizer(model, lr, args.weight_decay)
    warmup_steps = round(recipe.warmup_epochs(args.warmup_epochs, args.epochs) * steps_per_epoch)
    scheduler = recipe.scheduler(optimizer, lr, args.epochs * steps_per_epoch, warmup_steps)
    scaler = torch.amp.GradScaler(world.device.type) if args.amp == "fp16" else None
    mixup = recipe.mixup(args.mixup, args.cutmix, args.label_smoothing, data.num_classes)
    loss_fn = recipe.train_loss(args.label_smoothing, soft_targets=mixup is not None)

    start_epoch, step = 0, 0
    if resumed is not None:
        if args.fsdp:  # the model too: its parameters are sharded now
            distributed.load_full_state(model, optimizer, resumed["model"], resumed["optimizer"], fsdp=True)
        else:
            optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, step = resumed["epoch"], resumed["step"]
        checkpoint.set_rng_state(resumed["rng"][world.rank])
    else:
        distributed.seed_all(distributed.rank_seed(args.seed, world.rank))
    forward = torch.compile(wrapped) if args.compile else wrapped
    eval_model = forward if args.fsdp else (torch.compile(model) if args.compile else model)

    output = _output_folder(args)
    if world.is_main:
        os.makedirs(output, exist_ok=True)
        report.keep_metrics_before(output, start_epoch)
        print(f"{args.model} on {args.data}: {len(data.train)} train / {len(data.val)} val items, "
              f"{world.world_size} rank(s) on {world.device.type}, global batch {args.batch_size}, lr {lr:.3g}, "
              f"{steps_per_epoch} steps/epoch, output {output}", flush=True)
    for epoch in range(start_epoch, min(args.epochs, args.stop_after or args.epochs)):
        started = time.perf_counter()
        stats = loop.train_epoch(forward, train_loader, optimizer, scheduler, loss_fn, world=world, epoch=epoch,
                                 epochs=args.epochs, step=step, amp=args.amp, scaler=scaler,
                                 clip_grad=args.clip_grad, mixup=mixup, channels_last=args.channels_last,
                                 show_progress=not args.no_progress, on_step=on_step,
                                 max_steps=steps_per_epoch)
        step += stats["steps"]
        val = loop.evaluate(eval_model, val_loader, world=world, seed=args.seed, amp=args.amp,
                            channels_last=args.channels_last, equal_batches=args.fsdp)
        row = {"epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": val["loss"], "val_top1": val["top1"],
               "val_top5": val["top5"], "lr": stats["lr"], "images_per_s": stats["images_per_s"],
               "epoch_s": time.perf_counter() - started}
        _save(os.path.join(output, "last.pt"), args, world, model, optimizer, scheduler, scaler, epoch + 1, step)
        if world.is_main:
            report.append_metrics(output, row)
            print(report.epoch_line(row, args.epochs), flush=True)
    if world.is_main and report.read_metrics(output):
        curves = report.plot_curves(output)
        print(f"metrics: {os.path.join(output, report.METRICS)}" + (f", curves: {curves}" if curves else ""),
              flush=True)
    return {"output": output, "metrics": report.read_metrics(output) if world.is_main else [], "model": model}


def _workers(args) -> int:
    return 0 if args.data in ("digits", "fake") else args.workers  # in-memory tensors need no workers


def _save(path, args, world, model, optimizer, scheduler, scaler, epoch, step) -> None:
    """Every rank takes part (FSDP2 gathers, RNG states are per rank); rank 0 writes."""
    model_state, optimizer_state = distributed.full_state(model, optimizer, args.fsdp)
    rng = distributed.gather_objects(checkpoint.rng_state(), world)
    if world.is_main:
        checkpoint.save(path, {"model": model_state, "optimizer": optimizer_state,
                               "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                               "epoch": epoch, "step": step, "rng": rng,
                               "sampler": {"seed": args.seed, "epoch": epoch}, "args": vars(args)})
    if world.distributed:
        torch.distributed.barrier()  # last.pt is complete on return, on every rank
