"""Mask R-CNN with an rsir_micro FPN backbone on the synthetic shapes (shapes.py), from
scratch, DDP on gloo under torchrun (one thread per rank); after each epoch, COCO bbox and segm
AP on the held-out split with pycocotools' COCOeval. OUTPUT/metrics.jsonl (one row per epoch)
and OUTPUT/ap_curve.png.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 -m examples.dense_demo.detect
"""
from __future__ import annotations

import contextlib
import io
import time

import torch

from rsir_kernels.detection import maskrcnn_rsir_fpn
from rsir_kernels.train import distributed as D

from . import common
from .common import TRAIN_SEED, VAL_SEED
from .shapes import CLASSES, ShapesDataset, coco_api, encode_mask, to_coco


def build_model(model_name: str = "rsir_micro", size: int = 128, channels: int = 64, backend: str = "auto"):
    """Mask R-CNN sized for small images of small objects: no resize (min_size = max_size = the
    image size), anchors 16..256 (one per FPN level), a 64-channel FPN and light heads (a
    256-wide box MLP, four 64-channel mask convs), few RPN / ROI samples per image."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    classes = len(CLASSES) + 1
    anchors = AnchorGenerator(((16,), (32,), (64,), (128,), (256,)), ((0.5, 1.0, 2.0),) * 5)
    return maskrcnn_rsir_fpn(
        model_name, num_classes=None, backbone_kwargs=dict(out_channels=channels, backend=backend),
        min_size=size, max_size=size, rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, rpn_batch_size_per_image=128,
        box_batch_size_per_image=64, box_detections_per_img=20,
        box_head=TwoMLPHead(channels * 7 * 7, 256), box_predictor=FastRCNNPredictor(256, classes),
        mask_head=MaskRCNNHeads(channels, (channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(channels, channels, classes))


def collate(batch):
    return tuple(zip(*batch))


def train_step(model, optimizer, images, targets) -> dict:
    """One optimiser step on a batch; the loss terms as floats (and their sum as "loss")."""
    model.train()
    losses = model(list(images), list(targets))
    loss = sum(losses.values())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    optimizer.step()
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}}


@torch.no_grad()
def predict(model, dataset, indices) -> list[dict]:
    """COCO result entries (bbox [x, y, w, h], RLE segmentation of the mask > 0.5, score) for
    the given items."""
    model.eval()
    results = []
    for index in indices:
        image, _ = dataset[index]
        out = model([image])[0]
        for box, label, score, mask in zip(out["boxes"].tolist(), out["labels"].tolist(),
                                           out["scores"].tolist(), out["masks"][:, 0].numpy()):
            results.append({"image_id": int(index), "category_id": int(label), "score": float(score),
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                            "segmentation": encode_mask(mask > 0.5)})
    return results


def coco_eval(gt: dict, results: list[dict]) -> dict:
    """COCOeval's bbox and segm AP, AP50, AP75 (-1 where undefined, as COCOeval; 0.0 with no
    detection at all)."""
    out = {}
    if not results:
        return {f"{t}_{m}": 0.0 for t in ("bbox", "segm") for m in ("AP", "AP50", "AP75")}
    from pycocotools.cocoeval import COCOeval
    api = coco_api(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = api.loadRes(results)
        for kind in ("bbox", "segm"):
            e = COCOeval(api, detections, kind)
            e.evaluate()
            e.accumulate()
            e.summarize()
            out.update({f"{kind}_AP": float(e.stats[0]), f"{kind}_AP50": float(e.stats[1]),
                        f"{kind}_AP75": float(e.stats[2])})
    return out


def plot(output: str, rows: list[dict]) -> str:
    fig, (loss_ax, ap_ax) = common.two_panels()
    epochs = [r["epoch"] for r in rows]
    loss_ax.plot(epochs, [r["train_loss"] for r in rows], label="train (sum of the 5 terms)")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Mask R-CNN loss")
    for key, label in (("bbox_AP50", "bbox AP50"), ("bbox_AP", "bbox AP"), ("segm_AP50", "segm AP50"),
                       ("segm_AP", "segm AP")):
        ap_ax.plot(epochs, [r[key] for r in rows], marker="o", ms=3, label=label)
    ap_ax.set(xlabel="epoch", ylabel="AP", ylim=(0, 1), title="held-out COCO AP (pycocotools)")
    return common.save_figure(fig, (loss_ax, ap_ax), f"{output}/ap_curve.png")


def main(argv=None) -> int:
    return common.run_in_world(common.parser(__doc__, epochs=12).parse_args(argv), _run)


def _run(args, world) -> int:
    start = time.time()
    output = common.output_dir(args, world, "maskrcnn")
    D.seed_all(args.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    model = build_model(args.model, args.image_size, backend=args.backend)
    train = ShapesDataset(args.train_size, TRAIN_SEED, args.image_size)
    val = ShapesDataset(args.val_size, VAL_SEED, args.image_size)
    gt = to_coco(val) if world.is_main else None
    ddp = D.wrap(model, world, fsdp=False)
    sampler, loader = common.sharded_loader(train, args, world, collate)
    per_rank = args.batch_size // world.world_size
    optimizer, schedule = common.adamw_cosine(model, args, args.epochs * len(loader))
    torch.manual_seed(D.rank_seed(args.seed, world.rank))
    rows = []
    if world.is_main:
        print(f"output {output}: {args.model} Mask R-CNN, {len(train)} train / {len(val)} held-out images "
              f"of {args.image_size}px, {world.world_size} ranks x {per_rank} images, {len(loader)} steps/epoch",
              flush=True)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        t0, sums, n = time.time(), {}, 0
        for images, targets in loader:
            terms = train_step(ddp, optimizer, images, targets)
            schedule.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v
            n += 1
        train_s = time.time() - t0
        sums = dict(zip(sums, D.all_reduce_sum([v / n for v in sums.values()], world)))
        t1 = time.time()
        mine = predict(model, val, range(world.rank, len(val), world.world_size))
        results = [r for part in D.gather_objects(mine, world) for r in part]
        if world.is_main:
            row = {"epoch": epoch + 1, "train_loss": sums["loss"] / world.world_size,
                   **{k: v / world.world_size for k, v in sums.items() if k != "loss"},
                   **coco_eval(gt, results), "detections": len(results), "lr": schedule.get_last_lr()[0],
                   "train_s": round(train_s, 1), "eval_s": round(time.time() - t1, 1),
                   "elapsed_s": round(time.time() - start, 1)}
            rows.append(row)
            common.append_metrics(output, row)
            print(f"epoch {row['epoch']}/{args.epochs}  loss {row['train_loss']:.3f}  bbox AP {row['bbox_AP']:.3f} "
                  f"AP50 {row['bbox_AP50']:.3f}  segm AP {row['segm_AP']:.3f} AP50 {row['segm_AP50']:.3f}  "
                  f"train {train_s:.0f} s  eval {row['eval_s']:.0f} s  elapsed {row['elapsed_s']:.0f} s", flush=True)
            plot(output, rows)
        if common.time_is_up(args, start, world):
            break
    common.finish(model, output, start, "ap_curve.png", world)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
