"""The run's position and its files in OUTPUT: last.pt saved (`save`) and restored (`load`,
`restore`) in rsir_kernels/checkpoint_format.py's format, best.pt and checkpoint-EPOCH.pt
copied from it, and metrics.jsonl kept in step with it. A failed write is a WriteError on every
rank, the previous checkpoint intact."""
from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional

import torch

from .. import checkpoint_format
from . import distributed, report, resume, state_dicts
from .build import Training
from .errors import TrainError, write_failure

LAST = "last.pt"
SHARDED = "sharded"  # OUTPUT/sharded/step-N: --fsdp's DCP checkpoint of that step


@dataclasses.dataclass
class Position:
    epoch: int = 0                   # epochs done
    step: int = 0                    # optimizer steps done
    epoch_step: int = 0              # steps done in epoch `epoch` + 1 (a checkpoint saved mid-epoch)
    loss_sum: float = 0.0            # this rank's sum of those steps' losses
    last_row: Optional[dict] = None  # the metrics row of epoch `epoch`


def load(path: str) -> dict:
    """The checkpoint --resume names (checkpoint_format.load); TrainError naming it if it is
    missing, damaged or not a training checkpoint."""
    try:
        return checkpoint_format.load(path, "--resume")
    except checkpoint_format.CheckpointError as e:
        raise TrainError(str(e)) from e


def start(args, world) -> Position:
    """A fresh run's position; each rank's RNG seeded from (seed, rank)."""
    distributed.seed_all(distributed.rank_seed(args.seed, world.rank))
    return Position()


def restore(args, world, resumed: dict, t: Training) -> Position:
    """The optimizer's state (the DCP folder's, else last.pt's; under --fsdp the weights too),
    the scaler's, each rank's RNG state and the position. The optimizer's hyperparameters stay
    this run's (lr, initial_lr, weight_decay): the moments carry over, the settings do not."""
    chosen = [{k: v for k, v in g.items() if k != "params"} for g in t.optimizer.param_groups]
    if resumed.get("sharded"):  # DCP reshards to this world size, FSDP2 or not
        state_dicts.load_sharded(t.model, t.optimizer, resume.sharded_path(args.resume, resumed))
    else:
        if args.fsdp:  # the model too: its parameters are sharded now (else loaded before DDP, build.py)
            state_dicts.load_full_model(t.model, resumed["model"])
        state_dicts.load_full_optimizer(t.model, t.optimizer, resumed["optimizer"])
    for group, settings in zip(t.optimizer.param_groups, chosen):
        group.update(settings)
    if t.scaler is not None and resumed.get("scaler"):
        t.scaler.load_state_dict(resumed["scaler"])
    at = Position(resumed["epoch"], resumed["step"], last_row=resumed.get("metrics"))
    position = resumed.get("position")
    if position:  # saved mid-epoch: the rest of that epoch first
        at.epoch_step, sums = position["epoch_step"], position["loss_sums"]
        if len(sums) == world.world_size:
            at.loss_sum = sums[world.rank]
        else:  # the epoch's mean divides by steps * ranks: the old ranks' sums in this world's units
            at.loss_sum = sum(sums) / len(sums) * world.world_size if world.is_main else 0.0
    if len(resumed["rng"]) == world.world_size:
        checkpoint_format.set_rng_state(resumed["rng"][world.rank])
    else:  # another world size: no rank's stream continues; each starts from (seed, rank, step)
        distributed.seed_all(distributed.rank_seed(args.seed, world.rank, at.step))
    return at


def save(args, world, t: Training, epoch: int, step: int, row: Optional[dict],
         position: Optional[dict] = None) -> None:
    """OUTPUT/last.pt: every rank takes part (FSDP2 gathers, RNG states are per rank); rank 0
    writes. `position` marks a mid-epoch save. --fsdp: model and optimizer sharded by DCP into
    OUTPUT/sharded/step-N first, then last.pt (full weights, no optimizer) names that folder; a
    crash before last.pt's rename leaves the previous last.pt and its folder, which are deleted
    only after. A failed write is a WriteError on every rank."""
    output, sharded = args.output, None
    if args.fsdp:
        sharded = os.path.join(SHARDED, f"step-{step}")
        if world.is_main and os.path.exists(os.path.join(output, sharded)):
            shutil.rmtree(os.path.join(output, sharded))  # a save of this step cut short before
        if world.distributed:
            torch.distributed.barrier()
        try:
            state_dicts.save_sharded(t.model, t.optimizer, os.path.join(output, sharded))
        except Exception as e:  # DCP raises its CheckpointException, wrapping each rank's OSError, on every rank
            raise write_failure(os.path.join(output, sharded), e) from e
        model_state, optimizer_state = state_dicts.full_model_state(t.model), None
    else:
        model_state, optimizer_state = state_dicts.full_state(t.model, t.optimizer)
    rng = distributed.gather_objects(checkpoint_format.rng_state(), world)

    def write():
        model_args = {k: v for k, v in dataclasses.asdict(t.model.config).items() if k != "backend"}
        path = os.path.join(output, LAST)
        _written(path, lambda: checkpoint_format.save(path, {
            "model": model_state, "model_name": args.model, "model_args": model_args,
            "class_names": t.data.class_names, "metrics": row, "optimizer": optimizer_state,
            "scaler": t.scaler.state_dict() if t.scaler else None, "epoch": epoch, "step": step, "rng": rng,
            "sampler": {"seed": args.seed, "epoch": epoch}, "args": vars(args),
            "model_ema": {k: v.detach().cpu() for k, v in t.ema.module.state_dict().items()}
            if t.ema is not None else None, "sharded": sharded, "position": position, "data": t.fingerprint}))
        folders = os.path.join(output, SHARDED)
        for old in os.listdir(folders) if os.path.isdir(folders) else []:
            if os.path.join(SHARDED, old) != sharded:  # only last.pt's folder is kept
                shutil.rmtree(os.path.join(folders, old), ignore_errors=True)
    distributed.on_rank0(world, write)  # also the barrier: last.pt is complete on return, on every rank


def prepare_output(args, at: Position) -> None:
    """On rank 0 before the first epoch: --overwrite's files removed; metrics.jsonl rewritten as
    its rows before the checkpoint's epoch plus that epoch's row (a crash may have lost it from
    the file, or left rows of epochs after it): the file then matches last.pt."""
    output = args.output
    os.makedirs(output, exist_ok=True)
    if args.overwrite:
        for name in (*resume.RUN_FILES, report.CURVES):
            if os.path.exists(os.path.join(output, name)):
                os.remove(os.path.join(output, name))
        shutil.rmtree(os.path.join(output, SHARDED), ignore_errors=True)
    rows = [r for r in report.read_metrics(output) if r["epoch"] < at.epoch]
    report.write_metrics(output, rows + ([at.last_row] if at.last_row else []))


def best_score(args, at: Position) -> Optional[float]:
    """The best args.best_metric of the epochs done (rank 0 reads metrics.jsonl)."""
    return max((r[args.best_metric] for r in report.read_metrics(args.output) if r["epoch"] <= at.epoch
                and r.get(args.best_metric) is not None), default=None)


def record_epoch(args, row: dict, best: Optional[float]) -> Optional[float]:
    """On rank 0 after last.pt holds the epoch: best.pt when row beats `best`, the
    checkpoint-EPOCH.pt history, the metrics row appended. Returns the best score now."""
    output, last = args.output, os.path.join(args.output, LAST)
    score = row.get(args.best_metric)
    if score is not None and (best is None or score > best):
        best = score
        _written(os.path.join(output, "best.pt"), lambda: checkpoint_format.copy(last, os.path.join(output, "best.pt")))
    if args.checkpoint_hist:
        _keep_history(output, last, row["epoch"], args.checkpoint_hist)
    report.append_metrics(output, row)
    return best


def _keep_history(output: str, last: str, epoch: int, keep: int) -> None:
    """OUTPUT/checkpoint-EPOCH.pt for the last `keep` epochs (copies of last.pt)."""
    path = os.path.join(output, f"checkpoint-{epoch}.pt")
    _written(path, lambda: checkpoint_format.copy(last, path))
    for name in os.listdir(output):
        if name.startswith("checkpoint-") and name.endswith(".pt") and name[11:-3].isdigit():
            if int(name[11:-3]) <= epoch - keep:
                os.remove(os.path.join(output, name))


def _written(path: str, write) -> None:
    """write(), its failure (disk full, read-only, I/O) a WriteError naming path."""
    try:
        write()
    except (OSError, RuntimeError) as e:
        raise write_failure(path, e) from e
