"""One training epoch and one sharded evaluation."""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import TrainError
from .report import progress


def autocast(device: torch.device, amp: str):
    """torch.autocast for --amp bf16/fp16; nothing for fp32."""
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(images, labels, device, channels_last: bool):
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels.to(device, non_blocking=True)


class Diverged(TrainError):
    """A non-finite loss or gradient norm, seen by at least one rank (every rank raises it)."""
    every_rank = True  # rank 0 alone reports it


def _check_finite(value: Optional[torch.Tensor], what: str, world, epoch: int, step: int,
                  events: tuple[float, ...] = ()) -> list[float]:
    """All-reduced: when any rank's value is NaN or infinite every rank raises Diverged, so
    none is left waiting in a collective. events: this rank's counts (e.g. a stop signal seen),
    summed over the ranks in the same all-reduce and returned: every rank gets the same sums at
    the same step, so they act on them together."""
    bad = value is not None and not torch.isfinite(value).all().item()
    reduced = distributed.all_reduce_sum([float(bad) * 2.0 ** world.rank, *events], world)
    ranks = reduced[0]
    if ranks:
        where = "" if not world.distributed else " on rank " + ", ".join(
            str(r) for r in range(world.world_size) if int(ranks) >> r & 1)
        raise Diverged(f"training diverged at epoch {epoch + 1}, step {step + 1}: non-finite {what}{where} "
                       f"(last.pt keeps the last finite epoch; try a lower --lr or --clip-grad)")
    return reduced[1:]


def _gradient_sync(model: nn.Module, on: bool):
    """Gradient all-reduce on or off for the next backward: DDP's no_sync(), FSDP2's
    set_requires_gradient_sync (reduce-scatter), nothing in one process."""
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if on else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2's module
        model.set_requires_gradient_sync(on)
    return contextlib.nullcontext()


def _micro_batches(loader, steps: int, accum: int, stats: dict):
    """Yields lists of `accum` micro-batches, `steps` times; stats["data_s"] sums the time spent
    waiting for the loader (the input pipeline's share of the epoch)."""
    batches = iter(loader)
    for _ in range(steps):
        group = []
        for _ in range(accum):
            waited = time.perf_counter()
            group.append(next(batches))
            stats["data_s"] += time.perf_counter() - waited
        yield group


def train_epoch(model: nn.Module, loader, optimizer, scheduler, loss_fn, *, world, epoch: int, epochs: int,
                step: int, amp: str = "fp32", scaler=None, clip_grad: Optional[float] = None, mixup=None,
                channels_last: bool = False, show_progress: bool = True, accum: int = 1, erase=None, ema=None,
                on_step: Optional[Callable[[int, float, nn.Module], None]] = None, max_steps: Optional[int] = None,
                start: int = 0, loss_sum: float = 0.0, events: Optional[Callable[[], tuple]] = None,
                at_boundary: Optional[Callable[[int, int, float, list], None]] = None) -> dict:
    """Trains one epoch from optimizer step `step`; returns {"loss" (mean over the ranks and
    steps), "steps", "images_per_s" (global), "train_s", "data_s" (waiting for the loader),
    "lr" (last)}. A run resumed mid-epoch passes `start`, the epoch's steps done already (the
    loader skips their items), and `loss_sum`, this rank's sum of their losses. events() gives
    this rank's counts to agree on at each step (summed over the ranks with the loss check);
    at_boundary(epoch_step, step, loss_sum, summed events) runs on every rank after each
    optimizer step (a mid-epoch save; it may end the run). Each optimizer step takes `accum`
    micro-batches from the loader, each loss divided by accum (equal micro-batches: the sum of
    their gradients is the whole batch's mean), gradients synchronised on the last one only. erase: timm's RandomErasing on the
    batch (tensor data; ImageFolder erases in its transform); ema: timm's ModelEmaV3, updated
    after each optimizer step. on_step(step, loss of this rank) runs after each optimizer step;
    max_steps ends the epoch early.

    Diverged (on every rank, before the optimizer steps) when a loss is not finite, or, with
    clip_grad and no scaler, the gradient norm. scaler: timm's NativeScaler for fp16, whose
    skipped steps (inf gradients at too high a scale) are not divergence."""
    model.train()
    loader.sampler.set_epoch(epoch)
    if hasattr(getattr(loader, "dataset", None), "set_epoch"):  # data.SeededItems: augmentations per (epoch, item)
        loader.dataset.set_epoch(epoch)
    loader.sampler.skip = 0
    steps = min(len(loader) // accum, max_steps or len(loader))
    if start:
        loader.sampler.skip = start * accum * loader.batch_size
    loss_sum, images_seen = torch.tensor(loss_sum, dtype=torch.float64), 0
    bar = progress(steps, epoch, epochs, show_progress and world.is_main)
    bar.update(start)
    stats = {"data_s": 0.0}
    started = time.perf_counter()
    epoch_step = start
    for group in _micro_batches(loader, steps - start, accum, stats):
        scheduler.step_update(step)
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        for i, (images, labels) in enumerate(group):
            images, labels = to_device(images, labels, world.device, channels_last)
            if erase is not None:
                images = erase(images)
            if mixup is not None:
                images, labels = mixup(images, labels)
            last = i == accum - 1
            with _gradient_sync(model, last):
                with autocast(world.device, amp):
                    loss = loss_fn(model(images), labels)
                loss_value = loss.detach().float().cpu()
                agreed = _check_finite(loss_value, "loss", world, epoch, step,
                                       events() if events is not None and last else ())
                if scaler is not None:
                    scaler(loss / accum, optimizer, clip_grad=clip_grad, parameters=model.parameters(),
                           need_update=last)
                else:
                    (loss / accum).backward()
            step_loss += loss_value.double() / accum
            images_seen += images.shape[0] * world.world_size
        if scaler is None:
            # our own step, not NativeScaler's: the gradient norm is checked before the step
            if clip_grad is not None:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                _check_finite(norm.detach().float().cpu(), "gradient norm", world, epoch, step)
            optimizer.step()
        step += 1
        if ema is not None:
            ema.update(getattr(model, "module", model), step=step)  # timm's train.py: the updates done
        loss_sum += step_loss
        epoch_step += 1
        if on_step is not None:
            on_step(step, step_loss.item(), model)
        elapsed = time.perf_counter() - started
        bar.set_postfix(loss=f"{step_loss.item():.4f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}",
                        img_s=f"{images_seen / elapsed:.1f}", refresh=False)
        bar.update()
        if at_boundary is not None:
            at_boundary(epoch_step, step, loss_sum.item(), agreed)
    bar.close()
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
    train_s = time.perf_counter() - started
    total_loss, data_s = distributed.all_reduce_sum([loss_sum.item(), stats["data_s"]], world)
    return {"loss": total_loss / max(steps * world.world_size, 1), "steps": steps - start,
            "images_per_s": images_seen / train_s if train_s else 0.0, "train_s": train_s,
            "data_s": data_s / world.world_size, "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, world, seed: int, amp: str = "fp32",
             channels_last: bool = False, equal_batches: bool = False) -> dict:
    """Each rank evaluates its shard; the sums are all-reduced: {"loss" (plain cross-entropy),
    "top1", "top5" (percent), "items"}. RS-Win draws come from a generator state seeded by
    (seed, rank) and put back afterwards, so evaluation repeats and leaves training's RNG alone.
    equal_batches: FSDP2's forward is a collective, so every rank runs as many forwards as the
    rank with the most batches (agreed before the first one), the extra ones on one item and
    discarded. Sums, not timm's reduce_tensor (a mean): the shards' sizes differ."""
    from timm.utils import accuracy

    model.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # loss, top-1 hits, top-5 hits, items
    batches = len(loader)
    most = int(distributed.all_reduce_max([batches], world)[0]) if equal_batches else batches
    devices = [world.device] if world.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(distributed.rank_seed(seed, world.rank))
        for images, labels in loader:
            images, labels = to_device(images, labels, world.device, channels_last)
            with autocast(world.device, amp):
                logits = model(images)
            logits = logits.float()
            top1, top5 = accuracy(logits, labels, topk=(1, 5))  # percent of this batch
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").item()
            sums[1] += top1.item() * labels.numel() / 100
            sums[2] += top5.item() * labels.numel() / 100
            sums[3] += labels.numel()
        for _ in range(most - batches):
            model(images[:1])
    loss, top1, top5, items = distributed.all_reduce_sum(sums, world)
    items = max(items, 1)
    return {"loss": loss / items, "top1": 100 * round(top1) / items, "top5": 100 * round(top5) / items,
            "items": int(items)}
