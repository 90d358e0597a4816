"""What a resumed run keeps: its options as saved unless given again (`inherit`), those it may
not change (`check_resumable`), its data wherever it now lives (`check_data`); and `--resume
auto`, one command for a run's first start and every restart (`resolve_auto`)."""
from __future__ import annotations

import argparse
import os

from . import report
from .errors import TrainError

# Options of one invocation, never taken from the run: where and how this process runs (files,
# devices, parallelism, speed and memory), which may change with the machine a run resumes on.
INVOCATION = ("output", "resume", "overwrite", "stop_after", "no_progress", "workers", "threads", "device", "fsdp",
              "compile", "backend", "channels_last", "grad_checkpointing", "recompute_qkv")
RUN_FILES = ("last.pt", report.METRICS)  # a folder holding one of these, not empty, holds a run
# What a resumed run must share with its checkpoint (they fix the data order, the model's shape
# or the step count); every other option takes effect from the resumed step on. The data may
# move: check_data compares its fingerprint.
MUST_MATCH = ("model", "batch_size", "seed", "window_size", "train_items", "img_size", "steps_per_epoch")


def holds_run(output: str) -> bool:
    return any(os.path.getsize(f) for f in (os.path.join(output, n) for n in RUN_FILES) if os.path.isfile(f))


def resolve_auto(args: argparse.Namespace) -> None:
    """--resume auto: OUTPUT/last.pt when --output holds a run, else a fresh start there."""
    if args.overwrite and args.resume:
        raise TrainError("--overwrite starts the run afresh, --resume continues it: give one of them")
    if args.resume != "auto":
        return
    if not args.output:
        raise TrainError("--resume auto continues the run in --output, or starts it there: give --output")
    last = os.path.join(args.output, "last.pt")
    if os.path.isfile(last):
        args.resume = last
    elif os.path.isdir(args.output) and holds_run(args.output):
        raise TrainError(f"--resume auto: --output {args.output} holds {report.METRICS} but no last.pt; "
                         f"start afresh there with --overwrite")
    else:
        args.resume = None


def normalised_data(data: str) -> str:
    """'digits' and 'fake' as they are; a folder as an absolute path without a trailing slash."""
    return data if data in ("digits", "fake") else os.path.abspath(data)


def inherit(args: argparse.Namespace, saved: dict) -> list[str]:
    """Sets the options not given now to the values the run was given (saved["given"]; the run's
    resolved values for a checkpoint from before that record), so a resume continues the run it
    names: epochs, EMA, recipe and all. Returns the options given now with another value than
    the run's, as "--name old -> new" (printed in the banner)."""
    saved_given = saved.get("given")
    if saved_given is None:
        saved_given = {k: v for k, v in saved.items() if hasattr(args, k) and k != "given"}
    saved_given = {k: v for k, v in saved_given.items() if k not in INVOCATION and hasattr(args, k)}
    given_now = {k: v for k, v in args.given.items() if k not in INVOCATION}
    for name, value in saved_given.items():
        if name not in given_now:
            setattr(args, name, value)
    changes = []
    for name, value in given_now.items():
        before = saved_given.get(name, saved.get(name))
        if name == "data":
            before, value = normalised_data(str(before)), normalised_data(value)
        if before != value:
            changes.append(f"--{name.replace('_', '-')} {before!r} -> {value!r}")
    args.given = {**saved_given, **args.given}
    return changes


def check_resumable(args: argparse.Namespace, resumed: dict) -> None:
    """The resolved args against the checkpoint: MUST_MATCH and the kind of data unchanged, its
    DCP folder complete, --epochs not below the epochs begun; else a TrainError naming each."""
    saved = resumed["args"]
    mismatched = [k for k in MUST_MATCH if saved.get(k) != getattr(args, k)]
    kinds = {normalised_data(saved["data"]), args.data}
    if len(kinds) > 1 and kinds & {"digits", "fake"}:  # a folder may move (check_data), digits may not
        mismatched.insert(0, "data")
    if mismatched:
        raise TrainError(f"--resume {args.resume}: the run had different " + ", ".join(
            f"--{k.replace('_', '-')} ({saved.get(k)!r}, now {getattr(args, k)!r})" for k in mismatched)
            + "; these can't change within a run")
    if resumed.get("sharded") and not os.path.isfile(os.path.join(sharded_path(args.resume, resumed), ".metadata")):
        raise TrainError(f"--resume {args.resume}: its sharded checkpoint {sharded_path(args.resume, resumed)} "
                         f"is missing or incomplete")
    begun = resumed["epoch"] + (1 if resumed.get("position") else 0)  # a mid-epoch checkpoint's epoch has begun
    if args.epochs < begun:
        raise TrainError(f"--epochs {args.epochs}: the run has {'begun' if resumed.get('position') else 'done'} "
                         f"{begun} epochs already")


def sharded_path(resume: str, resumed: dict) -> str:
    """The DCP folder that the checkpoint at `resume` names (its "sharded", relative to the file)."""
    return os.path.join(os.path.dirname(os.path.abspath(resume)), resumed["sharded"])


def check_data(args: argparse.Namespace, resumed: dict, fingerprint: dict) -> str | None:
    """The run's data, found at args.data: equal fingerprints (class names, item counts, the
    file list) at any path; else a TrainError naming what differs. Returns a note when the data
    moved, None otherwise."""
    before, now = normalised_data(str(resumed["args"]["data"])), normalised_data(args.data)
    saved = resumed.get("data")
    if saved is None:  # a checkpoint from before fingerprints: the path is all there is to compare
        if before != now:
            raise TrainError(f"--resume {args.resume}: the run's data was {before}, now {now}, and this "
                             f"checkpoint has no fingerprint to tell whether it is the same data")
        return None
    differ = [describe for key, describe in (
        ("data", lambda: f"kind {saved['data']} vs {fingerprint['data']}"),
        ("classes", lambda: _classes(saved["classes"], fingerprint["classes"])),
        ("train_items", lambda: f"{saved['train_items']} train items vs {fingerprint['train_items']}"),
        ("val_items", lambda: f"{saved['val_items']} val items vs {fingerprint['val_items']}"),
        ("files", lambda: "the same counts but other file names"))
        if saved.get(key) != fingerprint.get(key)]
    if differ:
        raise TrainError(f"--resume {args.resume}: --data {args.data} is not the run's data ({before}): "
                         + "; ".join(d() for d in differ))
    return f"data moved: {before} -> {now} (the same classes, items and files)" if before != now else None


def _classes(before, now) -> str:
    if not isinstance(before, list) or not isinstance(now, list):
        return f"{before} classes vs {now}"
    added, removed = sorted(set(now) - set(before)), sorted(set(before) - set(now))
    return (f"{len(before)} classes vs {len(now)}" + (f", added {', '.join(added[:3])}" if added else "")
            + (f", missing {', '.join(removed[:3])}" if removed else "")
            + ("" if added or removed else ", in another order"))
