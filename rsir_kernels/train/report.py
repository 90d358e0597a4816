"""What a user sees (rank 0 only): a progress bar per epoch, one summary line per epoch,
OUTPUT/metrics.jsonl (one JSON object per epoch) and OUTPUT/curves.png at the end."""
from __future__ import annotations

import json
import os
import sys

METRICS = "metrics.jsonl"
CURVES = "curves.png"


def progress(steps: int, epoch: int, epochs: int, enabled: bool):
    """tqdm bar over an epoch's steps (shown on a terminal; silent in logs and on other ranks)."""
    from tqdm import tqdm
    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", disable=None if enabled else True,
                leave=False, file=sys.stderr, dynamic_ncols=True)


def epoch_line(row: dict, epochs: int) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
            f"val_top1 {row['val_top1']:.2f}%  val_top5 {row['val_top5']:.2f}%  lr {row['lr']:.3g}  "
            f"{row['images_per_s']:.1f} images/s  {row['epoch_s']:.1f} s")


def read_metrics(output: str) -> list[dict]:
    path = os.path.join(output, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def keep_metrics_before(output: str, epoch: int) -> None:
    """Drops rows of epochs > epoch (a resumed run rewrites what the interrupted one wrote
    after its checkpoint)."""
    rows = [r for r in read_metrics(output) if r["epoch"] <= epoch]
    with open(os.path.join(output, METRICS), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def append_metrics(output: str, row: dict) -> None:
    with open(os.path.join(output, METRICS), "a") as f:
        f.write(json.dumps(row) + "\n")


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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
