"""What detect.py and segment.py share: their options, the torchrun world, the optimiser and
its schedule, the sharded loader, the per-epoch metrics file, the time limit and the figure."""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from rsir_kernels.train import distributed as D

TRAIN_SEED, VAL_SEED = 1, 2  # the held-out split is another seed: no item in common


def parser(doc: str, *, epochs: int, batch_help: str = "global, over the ranks") -> argparse.ArgumentParser:
    """The options both demos take; each adds nothing else."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rsir_micro")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--train-size", type=int, default=800)
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after the epoch that passes this wall time (the eval included)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="default runs/<time>-<task>-<model>-shapes")
    return p


def run_in_world(args, run) -> int:
    """run(args, world) inside torchrun's process group (or alone), one thread per rank."""
    world = D.world_from_env(args.batch_size, "cpu")
    created = D.init(world, threads=1 if world.distributed else None)
    try:
        return run(args, world)
    finally:
        D.close(created)


def output_dir(args, world, task: str) -> str:
    output = args.output or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{task}-{args.model}-shapes")
    if world.is_main:
        os.makedirs(output, exist_ok=True)
    return output


def sharded_loader(dataset, args, world, collate_fn=None):
    """(sampler, loader): this rank's share of each epoch, batch-size / world-size items a step."""
    sampler = torch.utils.data.DistributedSampler(dataset, world.world_size, world.rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, args.batch_size // world.world_size, sampler=sampler,
                                         collate_fn=collate_fn, drop_last=True)
    return sampler, loader


def adamw_cosine(model, args, steps: int):
    """AdamW with weight decay on weights only (none on norms and biases), `warmup_steps` linear
    warmup then cosine to 0 over `steps`; the scheduler steps once per optimiser step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps)
                                                 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return optimizer, schedule


def append_metrics(output: str, row: dict) -> None:
    with open(os.path.join(output, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


def time_is_up(args, start: float, world) -> bool:
    """Past --max-minutes on any rank (the ranks agree, so all stop after the same epoch)."""
    stop = args.max_minutes is not None and time.time() - start > 60 * args.max_minutes
    return bool(D.all_reduce_max([float(stop)], world)[0])


def finish(model, output: str, start: float, figure: str, world) -> None:
    if world.is_main:
        torch.save(model.state_dict(), os.path.join(output, "last.pt"))
        print(f"done in {time.time() - start:.0f} s: {output}/metrics.jsonl, {output}/{figure}", flush=True)


def two_panels():
    """(figure, (left, right)) for a loss curve beside a metric curve."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(1, 2, figsize=(10, 4))


def save_figure(fig, axes, path: str) -> str:
    import matplotlib.pyplot as plt
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
