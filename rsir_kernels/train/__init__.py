"""python -m rsir_kernels.train: train an RSIR model, one process or one per device under torchrun.

    python -m rsir_kernels.train --data digits --model rsir_micro --epochs 30 --batch-size 64
    torchrun --standalone --nproc_per_node 2 -m rsir_kernels.train --data digits --epochs 30 --batch-size 64

Modules: cli (arguments), options (each checked, defaults resolved), data (digits / ImageFolder
/ fake, sharded loaders), augment (RandAugment, random erasing), model (timm names), recipe
(optimizer, schedule, loss, --recipe paper), build (model, data, loaders, optimizer: what a run
trains with), distributed (process group, DDP / FSDP2, seeds, collectives), state_dicts (full
and DCP state dicts), state
(the position; last.pt saved and restored, best.pt, history, metrics.jsonl in step), preempt
(SIGTERM/SIGUSR1), resume (a run's saved options, --resume auto, what may not change, data
identity), loop (one epoch with accumulation, sharded eval), report (metrics.jsonl,
curves.png), run (the whole run: options, build, position, epochs). The checkpoint's format is
rsir_kernels/checkpoint_format.py (models.from_checkpoint reads it too).
"""
from __future__ import annotations

import os
import sys

from .errors import Preempted, TrainError

__all__ = ["main", "TrainError"]


def main(argv: list[str] | None = None) -> int:
    """Parses argv and trains; returns the exit status: 0 done, 2 a TrainError (bad argument,
    input or checkpoint; divergence), 74 a file could not be written, 75 preempted by
    SIGTERM/SIGUSR1 with its position saved. Each prints one line on rank 0."""
    from .cli import parser
    from .run import train

    args = parser().parse_args(argv)
    try:
        train(args)
    except TrainError as e:
        if os.environ.get("RANK", "0") == "0" or not getattr(e, "every_rank", False):
            prefix = "preempted" if isinstance(e, Preempted) else "error"
            print(f"{prefix}: {_one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_status
    return 0


def _one_line(error: TrainError) -> str:
    """The message on one line; from a DataLoader worker, the original message without the
    worker's traceback (the loader re-raises it as TrainError("Caught ... Traceback ...: msg"))."""
    text = str(error)
    if "Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(f"{TrainError.__name__}: ", 1)[-1]
    return " ".join(text.split())
