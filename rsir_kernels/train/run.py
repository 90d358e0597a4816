"""The training run: options (options.py) -> what it trains with (build.py) -> its position,
fresh or resumed (state.py) -> the epochs, each saved -> the report."""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Optional

from torch import nn

from . import build, distributed, loop, options, preempt, recipe, report, resume, state
from .errors import Preempted, TrainError


def train(args: argparse.Namespace, on_step: Optional[Callable[[int, float, nn.Module], None]] = None) -> dict:
    """Runs the whole training; returns {"output", "metrics" (rows), "model" (the unwrapped
    module, sharded under FSDP2), "optimizer"}. on_step(step, loss, model) runs on every rank after each
    step (model: the trained, wrapped module). Every argument is checked before the data and
    the model are built; a TrainError names the bad one. A resumed run takes its saved options
    for those not given (resume.inherit). SIGTERM/SIGUSR1 end it after the current step with its
    position saved (Preempted); a failed write is a WriteError, the previous checkpoint intact."""
    try:
        resume.resolve_auto(args)
        resumed = state.load(args.resume) if args.resume else None
        changes = []
        if resumed is not None:
            changes = resume.inherit(args, resumed["args"])
            args.best_metric = resumed["args"].get("best_metric") or (
                "val_top1_ema" if resumed.get("model_ema") is not None else "val_top1")
        options.check(args)
        world = distributed.world_from_env(args.batch_size, args.device)
        options.check_backend(args.backend, world.device)
        options.resolve(args, world)
        if resumed is not None:
            resume.check_resumable(args, resumed)
        options.check_writable(args.output)  # last: a refused run leaves no folder behind
    except TrainError as e:
        e.every_rank = True  # every rank checks the same arguments: rank 0 alone reports them
        raise
    created = distributed.init(world, args.threads)
    try:
        with preempt.StopRequest() as stop:
            return _train(args, world, resumed, on_step, stop, changes)
    finally:
        distributed.close(created)


def _train(args, world, resumed, on_step, stop, changes) -> dict:
    t = build.training(args, world, resumed)
    at = state.restore(args, world, resumed, t) if resumed is not None else state.start(args, world)
    distributed.on_rank0(world, lambda: state.prepare_output(args, at))
    if world.is_main:
        _banner(args, world, t, at, resumed, changes)
    best = state.best_score(args, at) if world.is_main else None
    last = os.path.join(args.output, state.LAST)
    saved_at = [time.monotonic()]
    end = min(args.epochs, args.stop_after or args.epochs)

    def events() -> tuple:
        """This rank's (stop signal seen, a timed save due: rank 0's clock decides)."""
        due = (args.save_every_minutes is not None and world.is_main
               and time.monotonic() - saved_at[0] >= 60 * args.save_every_minutes)
        return float(stop.requested), float(due)

    for epoch in range(at.epoch, end):
        started = time.perf_counter()

        def at_boundary(done: int, step_now: int, rank_loss_sum: float, agreed: list) -> None:
            """After each optimizer step, on every rank with the same `agreed` sums: a mid-epoch
            save when a stop signal reached any rank, or one is due (the epoch's last step
            saves at the epoch's end instead); then a stop ends the run."""
            stopping = bool(agreed and agreed[0])
            due = bool(agreed and agreed[1]) or bool(args.save_every_steps and step_now % args.save_every_steps == 0)
            if stopping or (due and done < t.steps_per_epoch):
                sums = distributed.gather_objects(rank_loss_sum, world)
                state.save(args, world, t, epoch, step_now, at.last_row,
                           position={"epoch_step": done, "loss_sums": sums})
                saved_at[0] = time.monotonic()
            if stopping:
                raise Preempted(f"{stop.name or 'a stop signal'} at epoch {epoch + 1}, step {done}/{t.steps_per_epoch}: "
                                f"{last} holds this position; run the same command with --resume auto "
                                f"(or --resume {last}) to continue")

        stats = loop.train_epoch(t.forward, t.train_loader, t.optimizer, t.scheduler, t.loss_fn, world=world,
                                 epoch=epoch, epochs=args.epochs, step=at.step, amp=args.amp, scaler=t.scaler,
                                 clip_grad=args.clip_grad, mixup=t.mixup, channels_last=args.channels_last,
                                 show_progress=not args.no_progress, on_step=on_step,
                                 max_steps=t.steps_per_epoch, accum=args.grad_accum_steps, erase=t.erase, ema=t.ema,
                                 start=at.epoch_step, loss_sum=at.loss_sum, events=events, at_boundary=at_boundary)
        at.step += stats["steps"]
        at.epoch_step, at.loss_sum = 0, 0.0
        row = at.last_row = _evaluate(args, world, t, epoch, stats, started)
        state.save(args, world, t, epoch + 1, at.step, row)
        saved_at[0] = time.monotonic()

        def epoch_files():
            nonlocal best
            best = state.record_epoch(args, row, best)
            print(report.epoch_line(row, args.epochs), flush=True)
        distributed.on_rank0(world, epoch_files)
        if epoch + 1 < end and distributed.all_reduce_sum([float(stop.requested)], world)[0]:
            raise Preempted(f"{stop.name or 'a stop signal'} at the end of epoch {epoch + 1}: {last} holds it; run "
                            f"the same command with --resume auto (or --resume {last}) to continue")
    if world.is_main and report.read_metrics(args.output):
        curves = report.plot_curves(args.output)
        print(f"metrics: {os.path.join(args.output, report.METRICS)}" + (f", curves: {curves}" if curves else ""),
              flush=True)
    return {"output": args.output, "metrics": report.read_metrics(args.output) if world.is_main else [],
            "model": t.model, "optimizer": t.optimizer}


def _evaluate(args, world, t, epoch: int, stats: dict, started: float) -> dict:
    """The epoch's metrics row: training's stats, then the validation (and the EMA's top-1)."""
    val = loop.evaluate(t.eval_model, t.val_loader, world=world, seed=args.seed, amp=args.amp,
                        channels_last=args.channels_last, equal_batches=args.fsdp)
    row = {
        "epoch": epoch + 1, "train_loss": stats["loss"], "val_loss": val["loss"], "val_top1": val["top1"],
        "val_top5": val["top5"], "lr": stats["lr"], "images_per_s": stats["images_per_s"],
        "data_s": stats["data_s"], "epoch_s": time.perf_counter() - started}
    if t.ema is not None:
        row["val_top1_ema"] = loop.evaluate(t.ema.module, t.val_loader, world=world, seed=args.seed, amp=args.amp,
                                            channels_last=args.channels_last)["top1"]
    return report.strict_row(row)


def _banner(args, world, t, at, resumed, changes) -> None:
    """Rank 0's lines before the first epoch: the run, where a resume starts, the recipe."""
    print(f"{args.model} on {args.data}: {len(t.data.train)} train / {len(t.data.val)} val items, "
          f"{world.world_size} rank(s) on {world.device.type}, global batch {args.batch_size}, lr {args.lr:.3g}, "
          f"{t.steps_per_epoch} steps/epoch" + (f" of {args.grad_accum_steps} micro-batches"
                                                if args.grad_accum_steps > 1 else "")
          + f", output {args.output}", flush=True)
    if resumed is not None:
        print(f"resumed {args.resume} at epoch {at.epoch + 1}, step {at.epoch_step}/{t.steps_per_epoch} "
              f"(optimizer step {at.step})" + (f"; changed: {', '.join(changes)}" if changes else "")
              + (f"; {t.moved}" if t.moved else ""), flush=True)
    print(recipe.summary(args, args.recipe_skipped), flush=True)
