"""UPerNet (segmentation_models_pytorch) on the timm encoder tu-rsir_micro, trained from scratch
on the synthetic shapes as semantic masks (background + circle, square, triangle), DDP on gloo
under torchrun (one thread per rank); after each epoch the held-out mIoU over the 4 classes
(background included) from one confusion matrix summed over the ranks. OUTPUT/metrics.jsonl
and OUTPUT/miou_curve.png.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m examples.dense_demo.segment
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from rsir_kernels.train import distributed as D

from . import common
from .common import TRAIN_SEED, VAL_SEED
from .shapes import CLASSES, ShapesDataset

NUM_CLASSES = len(CLASSES) + 1


class Semantic(torch.utils.data.Dataset):
    def __init__(self, shapes: ShapesDataset):
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index):
        return self.shapes.semantic(index)


def build_model(model_name: str = "rsir_micro", decoder_channels: int = 64, backend: str = "auto"):
    import segmentation_models_pytorch as smp
    return smp.UPerNet(encoder_name=f"tu-{model_name}", encoder_weights=None, classes=NUM_CLASSES,
                       decoder_channels=decoder_channels, backend=backend)


def confusion(pred: torch.Tensor, target: torch.Tensor, classes: int = NUM_CLASSES) -> torch.Tensor:
    """(classes, classes) int64 counts, rows the true class, columns the predicted one."""
    return torch.bincount(target.flatten() * classes + pred.flatten(), minlength=classes * classes).view(classes, classes)


def miou(matrix) -> tuple[float, list[float]]:
    """(mean IoU over the classes present in the truth or the prediction, IoU per class: NaN
    where a class is in neither)."""
    m = torch.as_tensor(matrix, dtype=torch.float64)
    inter, union = m.diag(), m.sum(0) + m.sum(1) - m.diag()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.tensor(float("nan"), dtype=torch.float64))
    return float(iou[~iou.isnan()].mean()), iou.tolist()


@torch.no_grad()
def evaluate(model, dataset, indices, batch: int = 8) -> torch.Tensor:
    model.eval()
    total = torch.zeros(NUM_CLASSES, NUM_CLASSES, dtype=torch.int64)
    indices = list(indices)
    for i in range(0, len(indices), batch):
        images, labels = zip(*(dataset[j] for j in indices[i:i + batch]))
        total += confusion(model(torch.stack(images)).argmax(1), torch.stack(labels))
    return total


def plot(output: str, rows: list[dict]) -> str:
    fig, (loss_ax, iou_ax) = common.two_panels()
    epochs = [r["epoch"] for r in rows]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="UPerNet loss")
    iou_ax.plot(epochs, [r["mIoU"] for r in rows], marker="o", ms=3, label="mIoU (4 classes)")
    for k, name in enumerate(("background",) + CLASSES):
        iou_ax.plot(epochs, [r["IoU"][k] for r in rows], lw=0.8, alpha=0.7, label=name)
    iou_ax.set(xlabel="epoch", ylabel="IoU", ylim=(0, 1), title="held-out IoU")
    return common.save_figure(fig, (loss_ax, iou_ax), f"{output}/miou_curve.png")


def main(argv=None) -> int:
    p = common.parser(__doc__, epochs=10, batch_help="global, over the ranks (2 or more per rank: BatchNorm)")
    return common.run_in_world(p.parse_args(argv), _run)


def _run(args, world) -> int:
    start = time.time()
    output = common.output_dir(args, world, "upernet")
    D.seed_all(args.seed)
    model = build_model(args.model, backend=args.backend)
    train = Semantic(ShapesDataset(args.train_size, TRAIN_SEED, args.image_size))
    val = Semantic(ShapesDataset(args.val_size, VAL_SEED, args.image_size))
    ddp = D.wrap(model, world, fsdp=False)
    sampler, loader = common.sharded_loader(train, args, world)
    optimizer, schedule = common.adamw_cosine(model, args, args.epochs * len(loader))
    torch.manual_seed(D.rank_seed(args.seed, world.rank))
    rows = []
    if world.is_main:
        print(f"output {output}: UPerNet on tu-{args.model}, {len(train)} train / {len(val)} held-out images, "
              f"{world.world_size} ranks, {len(loader)} steps/epoch", flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        t0, loss_sum, n = time.time(), 0.0, 0
        ddp.train()
        for images, labels in loader:
            loss = F.cross_entropy(ddp(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum, n = loss_sum + float(loss.detach()), n + 1
        train_s = time.time() - t0
        t1 = time.time()
        matrix = evaluate(model, val, range(world.rank, len(val), world.world_size))
        matrix = torch.tensor(D.all_reduce_sum(matrix.flatten().tolist(), world)).view_as(matrix)
        loss_mean = D.all_reduce_sum([loss_sum / n], world)[0] / world.world_size
        if world.is_main:
            mean, per_class = miou(matrix)
            row = {"epoch": epoch + 1, "train_loss": loss_mean, "mIoU": mean, "IoU": per_class,
                   "pixel_acc": float(matrix.diag().sum() / matrix.sum()), "lr": schedule.get_last_lr()[0],
                   "train_s": round(train_s, 1), "eval_s": round(time.time() - t1, 1),
                   "elapsed_s": round(time.time() - start, 1)}
            rows.append(row)
            common.append_metrics(output, row)
            print(f"epoch {row['epoch']}/{args.epochs}  loss {loss_mean:.4f}  mIoU {mean:.3f}  "
                  f"IoU {' '.join(f'{v:.3f}' for v in per_class)}  train {train_s:.0f} s  eval {row['eval_s']:.0f} s  "
                  f"elapsed {row['elapsed_s']:.0f} s", flush=True)
            plot(output, rows)
        if common.time_is_up(args, start, world):
            break
    common.finish(model, output, start, "miou_curve.png", world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
