"""examples/dense_demo: the synthetic shapes set's COCO annotations, the COCO evaluation of the
detection demo, its training step and prediction entries, and the segmentation demo's mIoU;
each checked against something computed independently (pycocotools' own decoders, AP worked
out by hand, scikit-learn's confusion matrix). Skipped without pycocotools / smp."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (requirements-dev.txt)")

from examples.dense_demo import detect, shapes  # noqa: E402


@pytest.fixture(scope="module")
def small():
    ds = shapes.ShapesDataset(12, seed=5, size=96)
    return ds, shapes.to_coco(ds)


def test_items_are_deterministic_and_splits_differ():
    a, b = shapes.make_item(1, 3), shapes.make_item(1, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(shapes.make_item(2, 3)[0], a[0])


def test_coco_annotations_round_trip_through_pycocotools(small):
    """Each RLE decodes (pycocotools) to the item's mask; the bbox is pycocotools' toBbox of that
    RLE and the target's box; the area its pixel count; masks of one image do not overlap."""
    ds, coco = small
    by_image = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert sorted(by_image) == list(range(len(ds)))  # every image has 1..3 shapes
    for index, anns in by_image.items():
        image, target = ds[index]
        assert image.shape == (3, 96, 96) and 0 <= image.min() and image.max() <= 1
        assert len(anns) == len(target["labels"]) and 1 <= len(anns) <= 3
        total = np.zeros((96, 96), int)
        for ann, box, label, mask in zip(anns, target["boxes"], target["labels"], target["masks"]):
            rle = dict(ann["segmentation"], counts=ann["segmentation"]["counts"].encode())
            decoded = mask_utils.decode(rle)
            assert np.array_equal(decoded, mask.numpy())
            assert np.allclose(mask_utils.toBbox(rle), ann["bbox"])
            x, y, w, h = ann["bbox"]
            assert box.tolist() == [x, y, x + w, y + h]
            assert ann["area"] == decoded.sum() == float(mask_utils.area(rle)) and ann["category_id"] == int(label)
            total += decoded
        assert total.max() == 1
    json.dumps(coco)  # JSON-ready (RLE counts as str)


def _as_results(coco, keep=lambda ann: True, shift=0.0):
    out = []
    for ann in coco["annotations"]:
        if keep(ann):
            x, y, w, h = ann["bbox"]
            out.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                        "bbox": [x + shift * w, y, w, h], "segmentation": ann["segmentation"]})
    return out


def test_perfect_predictions_score_ap_one(small):
    _, coco = small
    stats = detect.coco_eval(coco, _as_results(coco))
    assert all(v == pytest.approx(1.0) for v in stats.values()), stats


def test_ap_of_partial_and_shifted_predictions_matches_a_hand_count(small):
    """Only the odd annotation ids detected (exactly): per category, precision 1 up to recall
    k / n and nothing after, so COCO's 101-point AP is #{t in 0, .01, .., 1 : t <= k / n} / 101,
    averaged over the categories. Boxes shifted right by 0.38 / 1.62 of their width: IoU 0.62
    with their truth, so AP50 is 1, AP75 is 0 and AP (thresholds .5:.05:.95) is 3/10."""
    _, coco = small
    keep = lambda ann: ann["id"] % 2 == 1  # noqa: E731
    expected = []
    for cat in coco["categories"]:
        anns = [a for a in coco["annotations"] if a["category_id"] == cat["id"]]
        if anns:
            recall = sum(map(keep, anns)) / len(anns)
            expected.append(sum(t <= recall + 1e-12 for t in np.linspace(0, 1, 101)) / 101)
    stats = detect.coco_eval(coco, _as_results(coco, keep))
    for kind in ("bbox", "segm"):
        assert stats[f"{kind}_AP"] == pytest.approx(np.mean(expected), abs=1e-9)
        assert stats[f"{kind}_AP50"] == pytest.approx(np.mean(expected), abs=1e-9)
    shifted = detect.coco_eval(coco, _as_results(coco, shift=0.38 / 1.62))
    assert shifted["bbox_AP50"] == pytest.approx(1.0) and shifted["bbox_AP75"] == 0.0
    assert shifted["bbox_AP"] == pytest.approx(0.3)
    assert detect.coco_eval(coco, [])["bbox_AP50"] == 0.0


def test_training_step_and_prediction_entries(small):
    """One optimiser step moves the weights with finite loss terms; the prediction entries are
    the model's own outputs (a separate forward): xywh boxes, RLEs of mask > 0.5; the COCO
    numbers lie in [0, 1]."""
    ds, coco = small
    torch.manual_seed(0)
    model = detect.build_model(size=96)
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    images, targets = detect.collate([ds[0], ds[1]])
    terms = detect.train_step(model, optimizer, images, targets)
    assert set(terms) == {"loss", "loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(np.isfinite(v) for v in terms.values())
    assert sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before)) > len(before) // 2
    results = detect.predict(model, ds, [2, 3])
    model.eval()
    with torch.no_grad():
        outs = model([ds[2][0], ds[3][0]])
    expected = [(i, out) for i, out in zip((2, 3), outs)]
    flat = [(i, b, m, s, l) for i, out in expected for b, m, s, l in
            zip(out["boxes"], out["masks"][:, 0], out["scores"], out["labels"])]
    assert len(results) == len(flat)
    for r, (i, box, mask, score, label) in zip(results, flat):
        x0, y0, x1, y1 = box.tolist()
        assert r["image_id"] == i and r["category_id"] == int(label) and r["score"] == pytest.approx(float(score))
        assert r["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=1e-4)
        rle = dict(r["segmentation"], counts=r["segmentation"]["counts"].encode())
        assert np.array_equal(mask_utils.decode(rle), (mask > 0.5).numpy().astype(np.uint8))
    stats = detect.coco_eval({**coco, "images": [im for im in coco["images"] if im["id"] in (2, 3)],
                              "annotations": [a for a in coco["annotations"] if a["image_id"] in (2, 3)]}, results)
    assert all(0.0 <= v <= 1.0 or v == -1.0 for v in stats.values())


def test_detection_demo_runs_an_epoch_and_writes_its_metrics(tmp_path):
    detect.main(["--epochs", "1", "--train-size", "2", "--val-size", "2", "--batch-size", "2",
                 "--image-size", "64", "--output", str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["epoch"] == 1 and np.isfinite(rows[0]["train_loss"])
    assert all(0.0 <= rows[0][k] <= 1.0 or rows[0][k] == -1.0 for k in ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"))
    assert (tmp_path / "ap_curve.png").stat().st_size > 0 and (tmp_path / "last.pt").exists()


def test_segmentation_miou_against_sklearn_and_a_train_step():
    pytest.importorskip("segmentation_models_pytorch", reason="segmentation_models_pytorch not installed")
    metrics = pytest.importorskip("sklearn.metrics")
    from examples.dense_demo import segment
    g = torch.Generator().manual_seed(0)
    truth, pred = torch.randint(0, 4, (3, 20, 20), generator=g), torch.randint(0, 3, (3, 20, 20), generator=g)
    matrix = segment.confusion(pred, truth)
    assert np.array_equal(matrix.numpy(), metrics.confusion_matrix(truth.flatten(), pred.flatten(), labels=range(4)))
    iou = metrics.jaccard_score(truth.flatten(), pred.flatten(), labels=range(4), average=None, zero_division=0)
    mean, per_class = segment.miou(matrix)
    assert per_class == pytest.approx(list(iou)) and mean == pytest.approx(iou.mean())
    _, absent = segment.miou(segment.confusion(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)))
    assert absent[0] == 1.0 and all(np.isnan(absent[1:]))
    ds = shapes.ShapesDataset(2, seed=5, size=64)
    torch.manual_seed(0)
    model = segment.build_model(decoder_channels=16)
    images, labels = map(torch.stack, zip(*(ds.semantic(i) for i in range(2))))
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3} and (labels > 0).any()
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.encoder.parameters())
    m = segment.evaluate(model, segment.Semantic(ds), [0, 1])
    assert int(m.sum()) == 2 * 64 * 64 and m[1:].sum() == int((labels > 0).sum())
