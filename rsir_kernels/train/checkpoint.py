"""OUTPUT/last.pt: written atomically (temporary file, fsync, rename), read with named errors.

Contents: "model" (a plain state dict that timm.create_model(name) loads), "optimizer",
"scheduler", "epoch" (epochs done), "step" (optimizer steps done), "rng" (one entry per rank:
torch CPU and CUDA, numpy and python states; RS-Win draws and drop-path use torch's global
RNG), "sampler" (seed; the epoch gives its order), "args" (the run's arguments).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from .errors import TrainError


def rng_state() -> dict:
    """This process's RNG states."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save(path: str, checkpoint: dict) -> None:
    """torch.save to path.tmp, fsync, then rename over path: a crash at any moment leaves the
    previous complete file or the new one, never a partial one."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY)  # the rename itself reaches the disk
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


REQUIRED = ("model", "optimizer", "scheduler", "epoch", "step", "rng", "sampler", "args")


def load(path: str) -> dict:
    """The checkpoint at path; TrainError naming the file if it is missing, unreadable or incomplete."""
    if not os.path.isfile(path):
        raise TrainError(f"--resume {path}: no such file")
    try:
        # numpy's RNG state holds numpy arrays and python's random state a tuple: not weights-only.
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a truncated or foreign file
        raise TrainError(f"--resume {path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    missing = [k for k in REQUIRED if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise TrainError(f"--resume {path}: not a training checkpoint (missing {', '.join(missing)})")
    return checkpoint
