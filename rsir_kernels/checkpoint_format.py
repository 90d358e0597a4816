"""The training checkpoint's format: OUTPUT/last.pt (and best.pt, checkpoint-EPOCH.pt, copies of
it), written atomically (temporary file, fsync, rename), read with its checksum verified.

Below models/ and train/ (both read it: models.from_checkpoint, detection's weights, the
trainer's save and resume); it imports neither. docs/design.md section 11 gives the rules.

Contents (plain types and tensors only, so torch.load(path, weights_only=True), timm's
load_checkpoint and create_model(checkpoint_path=...) read it):
  "model"        the state dict; it records the window size (a buffer "window_size"), so a model
                 built with another window refuses it
  "model_name"   the timm name, e.g. "rsir_micro"
  "model_args"   every constructor argument that shapes the computation (num_classes,
                 in_chans, window_size, drop_path_rate, ...): models.from_checkpoint(path) builds
                 model_name(**model_args)
  "class_names"  the ImageFolder class names, index = label (None for digits and fake data)
  "metrics"      the metrics.jsonl row of the last epoch completed (non-finite numbers as null)
  "optimizer"    the optimizer's state dict (full tensors); None under --fsdp, see "sharded"
  "sharded"      under --fsdp, the folder (relative to this file's) of the step's
                 torch.distributed.checkpoint (DCP) of {"model", "optimizer"}, each rank's shards
                 in its own file: --resume reads it at any world size, FSDP2 or one process;
                 "model" above still holds the full weights. Else None
  "scaler"       the fp16 GradScaler's state dict, or None
  "epoch", "step"  epochs and optimizer steps done
  "position"     a checkpoint saved mid-epoch (preemption, --save-every-steps): {"epoch_step":
                 the optimizer steps done in epoch "epoch" + 1, "loss_sums": each rank's sum of
                 its step losses so far in that epoch (float64)}; None at an epoch's end
  "data"         the data's fingerprint (data.fingerprint: class names, item counts, a hash of
                 the file list): a resume at another path checks it is the same data
  "rng"          one entry per rank: {"torch", "cuda" (list), "numpy" ({"keys": int64 tensor,
                 "pos", "has_gauss", "cached_gaussian"}), "python" ({"version", "internal": int64
                 tensor, "gauss_next"})}; RS-Win draws and drop-path use torch's global RNG
  "sampler"      {"seed", "epoch"}: the epoch gives the shuffled order
  "args"         the run's arguments, defaults resolved (window_size, lr, warmup_epochs are what ran);
                 args["given"]: the options given on the command lines of the run, as given (a resume
                 takes these for the options it is not given again), args["best_metric"]: the
                 metrics column that chooses best.pt for the whole run
  "model_ema"    with --model-ema, the state dict of timm's ModelEmaV3 copy (timm's load_checkpoint
                 and create_model(checkpoint_path=...) then load these weights, use_ema=True being
                 their default; from_checkpoint loads "model"); else None
  "checksum"     sha256 over every tensor above (its key path, dtype, shape and bytes)
The learning-rate schedule is not stored: it is a function of "step" and the arguments.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import shutil
import zipfile

import numpy as np
import torch

FORMAT_KEYS = ("model", "model_name", "model_args", "optimizer", "epoch", "step", "rng", "sampler", "args")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, damaged or not of this format; the message
    names the file. (The trainer reports it as a TrainError, exit status 2.)"""


def rng_state() -> dict:
    """This process's RNG states, as tensors and plain types (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n, p = state["numpy"], state["python"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))


def checksum(obj) -> str:
    """sha256 over the tensors in a nested dict/list (key paths, dtypes, shapes and bytes), the
    "checksum" entry excluded."""
    h = hashlib.sha256()

    def walk(path, value):
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{path}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                if not (path == "" and k == "checksum"):
                    walk(f"{path}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{path}/{i}", v)
    walk("", obj)
    return h.hexdigest()


def _write_atomically(path: str, write) -> None:
    """write(file) into path.tmp, fsync, rename over path, fsync the folder: a crash at any moment
    leaves the previous complete file or the new one. A failure (disk full, read-only, I/O:
    OSError, or torch.save's RuntimeError) is raised as it came, after path.tmp is removed; the
    previous path stands."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.tmp"
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(directory, os.O_RDONLY)  # the rename itself reaches the disk
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except (OSError, RuntimeError):
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def save(path: str, checkpoint: dict) -> None:
    """Adds the checksum and writes path atomically (_write_atomically): a crash at any moment
    leaves the previous complete file or the new one, never a partial one."""
    checkpoint = dict(checkpoint, checksum=checksum(checkpoint))
    _write_atomically(path, lambda f: torch.save(checkpoint, f))


def copy(source: str, path: str) -> None:
    """source's bytes to path, atomically as save() (best.pt, checkpoint-EPOCH.pt)."""
    with open(source, "rb") as src:
        _write_atomically(path, lambda f: shutil.copyfileobj(src, f))


def _written_by_torch_save(path: str) -> bool:
    """torch.save writes a zip archive, or (with _use_new_zipfile_serialization=False) a pickle,
    which opens with the PROTO opcode 0x80."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            return True
        f.seek(0)
        return f.read(1) == b"\x80"


def read(path: str, what: str = "checkpoint") -> dict:
    """torch.load(path, weights_only=True) with its checksum verified; CheckpointError naming the
    file (prefixed by `what`) if it is missing, unreadable or damaged. A file without a checksum
    (written before it existed) is read as it is."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # arbitrary objects: a foreign file, or one from before this format
        if not _written_by_torch_save(path):
            raise CheckpointError(f"{what} {path}: not a file torch.save writes (neither a zip archive nor a "
                                  f"pickle)") from e
        raise CheckpointError(f"{what} {path}: not a checkpoint of this format (it holds objects other than tensors "
                         f"and plain types; files of rsir_kernels before its checksum can't be resumed)") from e
    except Exception as e:  # torch raises several types for a truncated or foreign file
        reason = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{what} {path}: not a readable checkpoint ({type(e).__name__}: {reason})") from e
    if isinstance(checkpoint, dict) and "checksum" in checkpoint and checkpoint["checksum"] != checksum(checkpoint):
        raise CheckpointError(f"{what} {path}: damaged (its tensors do not match the checksum written with them)")
    return checkpoint


def load(path: str, what: str = "checkpoint") -> dict:
    """The training checkpoint at path (read()), checked to hold FORMAT_KEYS, what a resume needs."""
    checkpoint = read(path, what)
    missing = [k for k in FORMAT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise CheckpointError(f"{what} {path}: not a training checkpoint of this version (missing {', '.join(missing)})")
    return checkpoint
