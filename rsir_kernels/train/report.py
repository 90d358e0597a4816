"""What a user sees (rank 0 only): a progress bar per epoch, one summary line per epoch,
OUTPUT/metrics.jsonl (one JSON object per epoch) and OUTPUT/curves.png at the end."""
from __future__ import annotations

import json
import math
import os
import sys

from .errors import TrainError, write_failure

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def progress(steps: int, epoch: int, epochs: int, enabled: bool):
    """tqdm bar over an epoch's steps (shown on a terminal; silent in logs and on other ranks)."""
    from tqdm import tqdm
    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=None if enabled else True,
                leave=False, file=sys.stderr, dynamic_ncols=True)


def _num(value, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train_loss {_num(row['train_loss'], '.4f')}  "
            f"val_loss {_num(row['val_loss'], '.4f')}  val_top1 {_num(row['val_top1'], '.2f')}%  "
            f"val_top5 {_num(row['val_top5'], '.2f')}%  lr {row['lr']:.3g}  "
            + (f"val_top1_ema {_num(row['val_top1_ema'], '.2f')}%  " if "val_top1_ema" in row else "")
            + f"{row['images_per_s']:.1f} images/s  {row['epoch_s']:.1f} s (data wait {row.get('data_s', 0):.1f} s)")


def strict_row(row: dict) -> dict:
    """The row with NaN and infinities as None: strict JSON (json.dumps writes bare NaN tokens)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def read_metrics(output: str) -> list[dict]:
    """The rows of OUTPUT/metrics.jsonl. A torn last line (a write cut short: no newline, or not
    JSON) is left out; a damaged line before it is a TrainError naming the file and line."""
    path = os.path.join(output, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):  # the last line, without its newline: a torn append
                break
            raise TrainError(f"{path}: line {number} is not JSON ({e.msg}); delete or fix that line") from e
    return rows


def write_metrics(output: str, rows: list[dict]) -> None:
    """Rewrites OUTPUT/metrics.jsonl (atomically: temporary file, then rename); no rows and no
    file: nothing written."""
    path = os.path.join(output, METRICS)
    if not rows and not os.path.exists(path):
        return
    try:
        with open(f"{path}.tmp", "w") as f:
            f.writelines(json.dumps(strict_row(r), allow_nan=False) + "\n" for r in rows)
        os.replace(f"{path}.tmp", path)
    except OSError as e:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")
        raise write_failure(path, e) from e


def append_metrics(output: str, row: dict) -> None:
    """Appends row; a failed write is a WriteError (a torn line is dropped by read_metrics)."""
    path = os.path.join(output, METRICS)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(strict_row(row), allow_nan=False) + "\n")
    except OSError as e:
        raise write_failure(path, e) from e


def plot_curves(output: str) -> str | None:
    """OUTPUT/curves.png: train and val loss, val top-1 and top-5 against epoch. None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(output)
    epochs = [r["epoch"] for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [{k: float("nan") if v is None else v for k, v in r.items()} for r in rows]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train (smoothed labels)")
    loss_ax.plot(epochs, [r["val_loss"] for r in rows], label="val")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.plot(epochs, [r["val_top1"] for r in rows], label="val top-1")
    acc_ax.plot(epochs, [r["val_top5"] for r in rows], label="val top-5")
    acc_ax.set(xlabel="epoch", ylabel="%", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(output, CURVES)
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise write_failure(path, e) from e
    finally:
        plt.close(fig)
    return path
