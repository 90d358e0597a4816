"""The training run: arguments -> data, model, recipe, (resumed) state -> epochs -> report."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Callable, Optional

import torch
import torch.distributed
from torch import nn

from . import augment, checkpoint, data as datasets, distributed, loop, preempt, recipe, report, resume
from .errors import Preempted, TrainError, WriteError
from .model import MODEL_NAMES, create_model, pretrained_cfg

DIGITS_WINDOW = 4  # 32x32 digits: stage maps 8x8, 4x4, 2x2, 1x1; 4x4 windows tile stage 1 into 4
# What a resumed run must share with its checkpoint (they fix the data order, the model's shape
# or the step count); every other option takes effect from the resumed step on. The data may
# move: resume.check_data compares its fingerprint.
RESUME_MUST_MATCH = ("model", "batch_size", "seed", "window_size", "train_items", "img_size", "steps_per_epoch")
SHARDED = "sharded"  # OUTPUT/sharded/step-N: --fsdp's DCP checkpoint of that step
MAX_WORKERS = 8  # data loader processes per rank by default, at most
RUN_FILES = resume.RUN_FILES


def _check_args(args: argparse.Namespace) -> None:
    """Every argument on its own, before anything is built or written: TrainError naming it."""
    try:
        import timm  # noqa: F401  (importing it registers the RSIR models)
    except ImportError as e:
        raise TrainError(f"the trainer needs timm (models, optimizer, schedule): pip install 'timm>=1.0' ({e})") from e
    at_least = {"epochs": 1, "batch_size": 1, "grad_accum_steps": 1, "steps_per_epoch": 1, "stop_after": 1, "window_size": 1,
                "threads": 1, "train_items": 1, "val_items": 1, "workers": 0, "img_size": 32, "checkpoint_hist": 0,
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
    if args.img_size is not None and args.img_size % 32:
        raise TrainError(f"--img-size must be a multiple of 32 (the model downsamples by 32), got {args.img_size}")
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


def _check_writable(output: str) -> None:
    """--output can take files: created (as the run would) and a probe file written and removed,
    so a read-only or foreign folder is one line before anything is built."""
    try:
        os.makedirs(output, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output, prefix=".write-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise TrainError(f"--output {output}: not writable ({e.strerror or e})") from e


def _check_backend(backend: str, device: torch.device) -> None:
    from ..ops import available_backends
    backends = available_backends()
    if backend != "auto" and backend not in backends:
        raise TrainError(f"--backend {backend!r}: choose auto, {', '.join(backends)}")
    if backend != "auto" and not backends[backend].available:
        raise TrainError(f"--backend {backend}: not available here ({backends[backend].reason})")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise TrainError(f"--backend triton runs on CUDA devices, this run's is {device} (or set TRITON_INTERPRET=1)")


def _resolve(args: argparse.Namespace, world) -> None:
    """Fills the defaults that depend on other arguments, so that the saved args say what ran."""
    args.recipe_skipped = recipe.resolve(args)
    if args.workers is None:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        args.workers = max(1, min(MAX_WORKERS, (os.cpu_count() or 1) // ranks)) if args.data not in ("digits", "fake") else 0
    if args.window_size is None:
        from ..models.timm_registry import CONFIGS
        args.window_size = DIGITS_WINDOW if args.data == "digits" else CONFIGS[args.model].window_size
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


def _check_resume(args: argparse.Namespace, resumed: dict, world) -> None:
    saved = resumed["args"]
    mismatched = [k for k in RESUME_MUST_MATCH if saved.get(k) != getattr(args, k)]
    kinds = {resume.normalised_data(saved["data"]), args.data}
    if len(kinds) > 1 and kinds & {"digits", "fake"}:  # a folder may move (check_data), digits may not
        mismatched.insert(0, "data")
    if mismatched:
        raise TrainError(f"--resume {args.resume}: the run had different " + ", ".join(
            f"--{k.replace('_', '-')} ({saved.get(k)!r}, now {getattr(args, k)!r})" for k in mismatched)
            + "; these can't change within a run")
    if resumed.get("sharded") and not os.path.isfile(os.path.join(_sharded_path(args.resume, resumed), ".metadata")):
        raise TrainError(f"--resume {args.resume}: its sharded checkpoint {_sharded_path(args.resume, resumed)} "
                         f"is missing or incomplete")
    begun = resumed["epoch"] + (1 if resumed.get("position") else 0)  # a mid-epoch checkpoint's epoch has begun
    if args.epochs < begun:
        raise TrainError(f"--epochs {args.epochs}: the run has {'begun' if resumed.get('position') else 'done'} "
                         f"{begun} epochs already")


def _build(args, world) -> tuple:
    """(model on its device, Data, the data's fingerprint), the model initialised from args.seed
    (equal on every rank)."""
    distributed.seed_all(args.seed)
    common = dict(drop_path_rate=args.drop_path, backend=args.backend, recompute_qkv=args.recompute_qkv)
    if args.data == "digits":
        data = datasets.digits()
        model = create_model(args.model, num_classes=data.num_classes, in_chans=1, window_size=args.window_size,
                             **common)
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
                else datasets.image_folder(args.data, cfg, auto_augment=args.randaugment, reprob=args.reprob))
    fingerprint = datasets.fingerprint(data, args.data)
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
    return model, data, fingerprint


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
    module, sharded under FSDP2), "optimizer"}. on_step(step, loss, model) runs on every rank after each
    step (model: the trained, wrapped module). Every argument is checked before the data and
    the model are built; a TrainError names the bad one. A resumed run takes its saved options
    for those not given (resume.inherit). SIGTERM/SIGUSR1 end it after the current step with its
    position saved (Preempted); a failed write is a WriteError, the previous checkpoint intact."""
    try:
        resume.resolve_auto(args)
        resumed = checkpoint.load(args.resume) if args.resume else None
        changes = []
        if resumed is not None:
            changes = resume.inherit(args, resumed["args"])
            args.best_metric = resumed["args"].get("best_metric") or (
                "val_top1_ema" if resumed.get("model_ema") is not None else "val_top1")
        _check_args(args)
        world = distributed.world_from_env(args.batch_size, args.device)
        _check_backend(args.backend, world.device)
        _resolve(args, world)
        if resumed is not None:
            _check_resume(args, resumed, world)
        _check_writable(args.output)  # last: a refused run leaves no folder behind
    except TrainError as e:
        e.every_rank = True  # every rank checks the same arguments: rank 0 alone reports them
        raise
    created = distributed.init(world, args.threads)
    try:
        with preempt.StopRequest() as stop:
            return _train(args, world, resumed, on_step, stop, changes)
    finally:
        distributed.close(created)


def _on_rank0(world, write: Callable[[], None]) -> None:
    """write() on rank 0 (the run's files), then every rank learns whether it failed: a
    WriteError on every rank, so none waits in a collective for a rank 0 that has stopped."""
    error = None
    if world.is_main:
        try:
            write()
        except WriteError as e:
            error = e
    failed = distributed.all_reduce_sum([float(error is not None)], world)[0]
    if error is not None:
        raise error
    if failed:
        raise WriteError("rank 0 could not write the run's files")


def _train(args, world, resumed, on_step, stop, changes) -> dict:
    model, data, fingerprint = _build(args, world)
    moved = resume.check_data(args, resumed, fingerprint) if resumed is not None else None
    if resumed is not None and not args.fsdp:
        model.load_state_dict(resumed["model"])  # before DDP, which broadcasts rank 0's (the full weights)
    ema = None
    if args.model_ema is not None:  # timm's train.py: a copy of the unwrapped model, timm's decay warmup
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.model_ema, use_warmup=True)
        if resumed is not None and resumed.get("model_ema") is not None:
            ema.module.load_state_dict(resumed["model_ema"])
    wrapped = distributed.wrap(model, world, args.fsdp)
    micro_batch = args.batch_size // world.world_size // args.grad_accum_steps  # per rank, per backward
    train_loader = datasets.train_loader(data.train, micro_batch, world.rank, world.world_size, args.seed,
                                         _workers(args), seeded_items=args.data not in ("digits", "fake"))
    val_loader = datasets.eval_loader(data.val, micro_batch, world.rank, world.world_size, _workers(args))
    steps = len(train_loader) // args.grad_accum_steps
    steps_per_epoch = min(steps, args.steps_per_epoch or steps)
    if steps_per_epoch == 0:
        raise TrainError(f"the training set has {len(data.train)} items, fewer than one global batch "
                         f"(--batch-size {args.batch_size})")
    optimizer = recipe.optimizer(model, args.lr, args.weight_decay)
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    # The schedule is a function of the step and these arguments (none of it is loaded): a
    # resumed run with a new --epochs, --lr or --warmup-epochs follows the new schedule.
    scheduler = recipe.scheduler(optimizer, args.lr, args.epochs * steps_per_epoch, warmup_steps)
    from timm.utils import NativeScaler
    scaler = NativeScaler(world.device.type) if args.amp == "fp16" else None
    mixup = recipe.mixup(args.mixup, args.cutmix, args.label_smoothing, data.num_classes)
    loss_fn = recipe.train_loss(args.label_smoothing, soft_targets=mixup is not None)
    # ImageFolder erases in its transform (per image, in the loader); tensor data on the batch
    erase = augment.batch_eraser(args.reprob, world.device) if args.data in ("digits", "fake") else None

    start_epoch, step, epoch_step, loss_sum, last_row = 0, 0, 0, 0.0, None
    if resumed is not None:
        chosen = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        if resumed.get("sharded"):  # DCP reshards to this world size, FSDP2 or not
            distributed.load_sharded(model, optimizer, _sharded_path(args.resume, resumed))
        elif args.fsdp:  # the model too: its parameters are sharded now
            distributed.load_full_state(model, optimizer, resumed["model"], resumed["optimizer"], fsdp=True)
        else:
            optimizer.load_state_dict(resumed["optimizer"])
        for group, settings in zip(optimizer.param_groups, chosen):  # this run's lr and weight decay
            group.update(settings)
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, step, last_row = resumed["epoch"], resumed["step"], resumed.get("metrics")
        position = resumed.get("position")
        if position:  # saved mid-epoch: the rest of that epoch first
            epoch_step, sums = position["epoch_step"], position["loss_sums"]
            if len(sums) == world.world_size:
                loss_sum = sums[world.rank]
            else:  # the epoch's mean divides by steps * ranks: the old ranks' sums in this world's units
                loss_sum = sum(sums) / len(sums) * world.world_size if world.is_main else 0.0
        if len(resumed["rng"]) == world.world_size:
            checkpoint.set_rng_state(resumed["rng"][world.rank])
        else:  # another world size: no rank's stream continues; each starts from (seed, rank, step)
            distributed.seed_all(distributed.rank_seed(args.seed, world.rank, step))
    else:
        distributed.seed_all(distributed.rank_seed(args.seed, world.rank))
    forward = torch.compile(wrapped) if args.compile else wrapped
    eval_model = forward if args.fsdp else (torch.compile(model) if args.compile else model)

    output, last = args.output, os.path.join(args.output, "last.pt")

    def start_files():
        os.makedirs(output, exist_ok=True)
        if args.overwrite:
            for name in (*RUN_FILES, report.CURVES):
                if os.path.exists(os.path.join(output, name)):
                    os.remove(os.path.join(output, name))
            shutil.rmtree(os.path.join(output, SHARDED), ignore_errors=True)
        # the rows before the checkpoint's epoch, then its own row (a crash may have lost it from
        # the file, or left rows of epochs after it): the file then matches last.pt
        rows = [r for r in report.read_metrics(output) if r["epoch"] < start_epoch]
        report.write_metrics(output, rows + ([last_row] if last_row else []))
    _on_rank0(world, start_files)
    if world.is_main:
        print(f"{args.model} on {args.data}: {len(data.train)} train / {len(data.val)} val items, "
              f"{world.world_size} rank(s) on {world.device.type}, global batch {args.batch_size}, lr {args.lr:.3g}, "
              f"{steps_per_epoch} steps/epoch" + (f" of {args.grad_accum_steps} micro-batches" if args.grad_accum_steps > 1
                                                  else "") + f", output {output}", flush=True)
        if resumed is not None:
            print(f"resumed {args.resume} at epoch {start_epoch + 1}, step {epoch_step}/{steps_per_epoch} "
                  f"(optimizer step {step})" + (f"; changed: {', '.join(changes)}" if changes else "")
                  + (f"; {moved}" if moved else ""), flush=True)
        print(recipe.summary(args, args.recipe_skipped), flush=True)
    best = max((r[args.best_metric] for r in report.read_metrics(output) if r["epoch"] <= start_epoch
                and r.get(args.best_metric) is not None), default=None) if world.is_main else None
    saved_at = [time.monotonic()]
    end = min(args.epochs, args.stop_after or args.epochs)

    def events() -> tuple:
        """This rank's (stop signal seen, a timed save due: rank 0's clock decides)."""
        due = (args.save_every_minutes is not None and world.is_main
               and time.monotonic() - saved_at[0] >= 60 * args.save_every_minutes)
        return float(stop.requested), float(due)

    for epoch in range(start_epoch, end):
        started = time.perf_counter()

        def at_boundary(done: int, step_now: int, rank_loss_sum: float, agreed: list) -> None:
            """After each optimizer step, on every rank with the same `agreed` sums: a mid-epoch
            save when a stop signal reached any rank, or one is due (the epoch's last step
            saves at the epoch's end instead); then a stop ends the run."""
            stopping = bool(agreed and agreed[0])
            due = bool(agreed and agreed[1]) or bool(args.save_every_steps and step_now % args.save_every_steps == 0)
            if stopping or (due and done < steps_per_epoch):
                sums = distributed.gather_objects(rank_loss_sum, world)
                _save(last, args, world, model, data, optimizer, scaler, epoch, step_now, last_row, ema,
                      position={"epoch_step": done, "loss_sums": sums}, fingerprint=fingerprint)
                saved_at[0] = time.monotonic()
            if stopping:
                raise Preempted(f"{stop.name or 'a stop signal'} at epoch {epoch + 1}, step {done}/{steps_per_epoch}: "
                                f"{last} holds this position; run the same command with --resume auto "
                                f"(or --resume {last}) to continue")

        stats = loop.train_epoch(forward, train_loader, optimizer, scheduler, loss_fn, world=world, epoch=epoch,
                                 epochs=args.epochs, step=step, amp=args.amp, scaler=scaler,
                                 clip_grad=args.clip_grad, mixup=mixup, channels_last=args.channels_last,
                                 show_progress=not args.no_progress, on_step=on_step,
                                 max_steps=steps_per_epoch, accum=args.grad_accum_steps, erase=erase, ema=ema,
                                 start=epoch_step, loss_sum=loss_sum, events=events, at_boundary=at_boundary)
        step += stats["steps"]
        epoch_step, loss_sum = 0, 0.0
        val = loop.evaluate(eval_model, val_loader, world=world, seed=args.seed, amp=args.amp,
                            channels_last=args.channels_last, equal_batches=args.fsdp)
        row = {
            "epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": val["loss"], "val_top1": val["top1"],
            "val_top5": val["top5"], "lr": stats["lr"], "images_per_s": stats["images_per_s"],
            "data_s": stats["data_s"], "epoch_s": time.perf_counter() - started}
        if ema is not None:
            row["val_top1_ema"] = loop.evaluate(ema.module, val_loader, world=world, seed=args.seed, amp=args.amp,
                                                channels_last=args.channels_last)["top1"]
        row = last_row = report.strict_row(row)
        _save(last, args, world, model, data, optimizer, scaler, epoch + 1, step, row, ema, fingerprint=fingerprint)
        saved_at[0] = time.monotonic()

        def epoch_files():
            nonlocal best
            score = row.get(args.best_metric)
            if score is not None and (best is None or score > best):
                best = score
                checkpoint.copy(last, os.path.join(output, "best.pt"))
            if args.checkpoint_hist:
                _keep_history(output, last, epoch + 1, args.checkpoint_hist)
            report.append_metrics(output, row)
            print(report.epoch_line(row, args.epochs), flush=True)
        _on_rank0(world, epoch_files)
        if epoch + 1 < end and distributed.all_reduce_sum([float(stop.requested)], world)[0]:
            raise Preempted(f"{stop.name or 'a stop signal'} at the end of epoch {epoch + 1}: {last} holds it; run "
                            f"the same command with --resume auto (or --resume {last}) to continue")
    if world.is_main and report.read_metrics(output):
        curves = report.plot_curves(output)
        print(f"metrics: {os.path.join(output, report.METRICS)}" + (f", curves: {curves}" if curves else ""),
              flush=True)
    return {"output": output, "metrics": report.read_metrics(output) if world.is_main else [], "model": model,
            "optimizer": optimizer}


def _keep_history(output: str, last: str, epoch: int, keep: int) -> None:
    """OUTPUT/checkpoint-EPOCH.pt for the last `keep` epochs (copies of last.pt)."""
    checkpoint.copy(last, os.path.join(output, f"checkpoint-{epoch}.pt"))
    for name in os.listdir(output):
        if name.startswith("checkpoint-") and name.endswith(".pt") and name[11:-3].isdigit():
            if int(name[11:-3]) <= epoch - keep:
                os.remove(os.path.join(output, name))


def _workers(args) -> int:
    return 0 if args.data in ("digits", "fake") else args.workers  # in-memory tensors need no workers


def _sharded_path(resume: str, resumed: dict) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(resume)), resumed["sharded"])


def _save(path, args, world, model, data, optimizer, scaler, epoch, step, row, ema=None, position=None,
          fingerprint=None) -> None:
    """Every rank takes part (FSDP2 gathers, RNG states are per rank); rank 0 writes. The
    contents are checkpoint.py's; `position` marks a mid-epoch save. --fsdp: model and optimizer
    sharded by DCP into OUTPUT/sharded/step-N first, then last.pt (full weights, no optimizer)
    names that folder; a crash before last.pt's rename leaves the previous last.pt and its
    folder, which are deleted only after. A failed write is a WriteError on every rank."""
    output, sharded = os.path.dirname(path), None
    if args.fsdp:
        sharded = os.path.join(SHARDED, f"step-{step}")
        if world.is_main and os.path.exists(os.path.join(output, sharded)):
            shutil.rmtree(os.path.join(output, sharded))  # a save of this step cut short before
        if world.distributed:
            torch.distributed.barrier()
        try:
            distributed.save_sharded(model, optimizer, os.path.join(output, sharded))
        except Exception as e:  # DCP raises its CheckpointException, wrapping each rank's OSError, on every rank
            from .errors import write_failure
            raise write_failure(os.path.join(output, sharded), e) from e
        model_state, optimizer_state = distributed.full_model_state(model, True), None
    else:
        model_state, optimizer_state = distributed.full_state(model, optimizer, False)
    rng = distributed.gather_objects(checkpoint.rng_state(), world)

    def write():
        model_args = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "backend"}
        checkpoint.save(path, {"model": model_state, "model_name": args.model, "model_args": model_args,
                               "class_names": data.class_names, "metrics": row, "optimizer": optimizer_state,
                               "scaler": scaler.state_dict() if scaler else None, "epoch": epoch, "step": step,
                               "rng": rng, "sampler": {"seed": args.seed, "epoch": epoch}, "args": vars(args),
                               "model_ema": {k: v.detach().cpu() for k, v in ema.module.state_dict().items()}
                               if ema is not None else None, "sharded": sharded, "position": position,
                               "data": fingerprint})
        for old in os.listdir(os.path.join(output, SHARDED)) if os.path.isdir(os.path.join(output, SHARDED)) else []:
            if os.path.join(SHARDED, old) != sharded:  # only last.pt's folder is kept
                shutil.rmtree(os.path.join(output, SHARDED, old), ignore_errors=True)
    _on_rank0(world, write)  # also the barrier: last.pt is complete on return, on every rank
