"""torch.distributed plumbing: the process group from torchrun's environment, per-rank seeds,
DDP / FSDP2 wrapping, all-reduce of metrics and rank 0's writes (state_dicts.py: the model's
and optimizer's state for checkpoints).

Without torchrun (no WORLD_SIZE in the environment) everything runs as rank 0 of 1, with no
process group. Not timm's init_distributed_device: the batch is checked before any process
group exists, a caller's group is reused, and CPU ranks share the cores out.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import TrainError, WriteError


@dataclasses.dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(global_batch: int, device: str | None = None) -> World:
    """Reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and checks the global batch divides by
    the world size before any process group exists (a bad batch must not leave ranks waiting)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if global_batch < world_size or global_batch % world_size:
        raise TrainError(f"--batch-size {global_batch} (global) must be a multiple of the world size "
                         f"{world_size}")
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return World(rank, world_size, local_rank, torch.device(device))


def init(world: World, threads: int | None = None) -> bool:
    """One process per device: nccl on CUDA, gloo on CPU; a process group that exists already
    (a caller's) is used as it is. On CPU, `threads` intra-op threads (default: the cores
    shared out among this node's ranks, e.g. 1 per rank for 2 ranks on 2 cores; more threads
    than free cores make OpenMP's spinning threads wait on each other). Returns whether it
    created the process group (then close() destroys it)."""
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    elif threads is not None or world.distributed:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_ranks))
    if world.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if world.device.type == "cuda" else "gloo",
                                device_id=world.device if world.device.type == "cuda" else None)
        return True
    return False


def close(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def seed_all(seed: int) -> None:
    """torch (CPU and every CUDA device), numpy and python's random (timm's random_seed; numpy
    takes 32-bit seeds)."""
    from timm.utils import random_seed
    random_seed(seed % 2 ** 32)


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """A seed for (seed, rank, *more): ranks draw different RS-Win windows, dropout and drop-path
    masks, and a run with the same seed draws the same ones again. A run resumed at another
    world size seeds every rank from (seed, rank, step)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1, dtype=np.uint64)[0] % 2 ** 63)


def wrap(model: nn.Module, world: World, fsdp: bool) -> nn.Module:
    """DDP (parameters broadcast from rank 0, gradients averaged), or FSDP2: fully_shard each
    RSIR block, then the whole model (parameters sharded in place). One process: unchanged."""
    if not world.distributed:
        if fsdp:
            raise TrainError("--fsdp needs several processes (run under torchrun --nproc_per_node N)")
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        from ..modules import RSIRBlock
        for module in model.modules():
            if isinstance(module, RSIRBlock):
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Element-wise sum of values over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    if world.distributed:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], world: World) -> list[float]:
    """Element-wise maximum of values over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def on_rank0(world: World, write) -> None:
    """write() on rank 0 (the run's files), then every rank learns whether it failed: a
    WriteError on every rank, so none waits in a collective for a rank 0 that has stopped."""
    error = None
    if world.is_main:
        try:
            write()
        except WriteError as e:
            error = e
    failed = all_reduce_sum([float(error is not None)], world)[0]
    if error is not None:
        raise error
    if failed:
        raise WriteError("rank 0 could not write the run's files")


def gather_objects(obj, world: World) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
