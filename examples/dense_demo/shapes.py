"""A deterministic synthetic instance set: circles, squares and triangles of random colours on
a random background with noise, each item drawn from (seed, index) alone, so any process
builds the same item without a file. Boxes are the masks' extents; to_coco writes the
annotations in COCO's format (RLE masks through pycocotools.mask.encode).

    ds = ShapesDataset(200, seed=1)
    image, target = ds[0]   # float (3, H, W) in [0, 1]; boxes (N, 4) x0, y0, x1, y1, labels (N,), masks (N, H, W) uint8
    coco = to_coco(ds)      # {"images", "annotations", "categories"}
"""
from __future__ import annotations

import numpy as np
import torch

CLASSES = ("circle", "square", "triangle")  # category ids 1, 2, 3; 0 is the background


def _shape_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of shape `kind` (1 circle, 2 square, 3 triangle) of radius r
    (half-side for the square, circumradius for the triangle) centred at (cx, cy), rotated."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = x - cx, y - cy
    if kind == 1:
        return dx * dx + dy * dy <= r * r
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if kind == 2:
        return (np.abs(u) <= r) & (np.abs(v) <= r)
    # triangle: inside the three half-planes of an equilateral triangle (inradius r / 2)
    inside = np.ones_like(u, dtype=bool)
    for k in range(3):
        a = angle + np.pi / 2 + k * 2 * np.pi / 3
        inside &= dx * np.cos(a) + dy * np.sin(a) <= r / 2
    return inside


def make_item(seed: int, index: int, size: int = 128, max_objects: int = 3,
              min_radius: int = 10, max_radius: int = 24):
    """(image uint8 (size, size, 3), masks bool (N, size, size), labels int (N,)) for item
    `index` of the set `seed`; 1..max_objects shapes that do not overlap (a placement that
    would is redrawn, up to 20 tries)."""
    rng = np.random.default_rng([seed, index])
    background = rng.uniform(0, 255, 3)
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    image += rng.normal(0, 12, (size, size, 3))
    masks, labels, occupied = [], [], np.zeros((size, size), bool)
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _try in range(20):
            kind = int(rng.integers(1, len(CLASSES) + 1))
            r = rng.uniform(min_radius, max_radius)
            cx, cy = rng.uniform(r, size - r, 2)
            mask = _shape_mask(kind, cx, cy, r, rng.uniform(0, 2 * np.pi), size)
            if mask.sum() >= 16 and not (mask & _dilate(occupied)).any():
                break
        else:
            continue
        colour = rng.uniform(0, 255, 3)
        while np.abs(colour - background).sum() < 150:  # visible against the background
            colour = rng.uniform(0, 255, 3)
        image[mask] = colour + rng.normal(0, 12, (int(mask.sum()), 3))
        occupied |= mask
        masks.append(mask)
        labels.append(kind)
    image = np.clip(image, 0, 255).astype(np.uint8)
    masks = np.stack(masks) if masks else np.zeros((0, size, size), bool)
    return image, masks, np.asarray(labels, np.int64)


def _dilate(mask: np.ndarray) -> np.ndarray:
    """The mask grown by 2 pixels (shapes keep a gap between them)."""
    out = mask.copy()
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            out |= np.roll(mask, shift, axis)
    return out


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """(N, 4) float boxes x0, y0, x1, y1 (x1, y1 exclusive: one past the last pixel), the masks'
    extents, as COCO's [x, y, w, h] of the same mask has w = x1 - x0."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[i] = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return boxes


class ShapesDataset(torch.utils.data.Dataset):
    """`length` items of the set `seed` (train and held-out splits: different seeds)."""

    def __init__(self, length: int, seed: int, size: int = 128, max_objects: int = 3):
        self.length, self.seed, self.size, self.max_objects = length, seed, size, max_objects

    def __len__(self) -> int:
        return self.length

    def raw(self, index: int):
        return make_item(self.seed, index, self.size, self.max_objects)

    def __getitem__(self, index: int):
        image, masks, labels = self.raw(index)
        target = {"boxes": torch.from_numpy(mask_boxes(masks)), "labels": torch.from_numpy(labels),
                  "masks": torch.from_numpy(masks.astype(np.uint8)), "image_id": index}
        return torch.from_numpy(image).permute(2, 0, 1).float().div(255), target

    def semantic(self, index: int):
        """(image float (3, H, W), class map int64 (H, W): 0 background, else the shape's id)."""
        image, masks, labels = self.raw(index)
        classes = np.zeros((self.size, self.size), np.int64)
        for m, label in zip(masks, labels):
            classes[m] = label
        return torch.from_numpy(image).permute(2, 0, 1).float().div(255), torch.from_numpy(classes)


def encode_mask(mask: np.ndarray) -> dict:
    """COCO's RLE of a (H, W) mask, counts as str (JSON-ready)."""
    from pycocotools import mask as mask_utils
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def to_coco(dataset: ShapesDataset, path: str | None = None) -> dict:
    """The dataset's ground truth in COCO's format: image ids = indices, annotation ids from 1,
    bbox [x, y, w, h] = the mask's extent, area = the mask's pixel count, RLE segmentation,
    iscrowd 0. Written as JSON to `path` when given."""
    images, annotations = [], []
    for index in range(len(dataset)):
        _, masks, labels = dataset.raw(index)
        images.append({"id": index, "width": dataset.size, "height": dataset.size,
                       "file_name": f"{dataset.seed}-{index}.png"})
        for m, box, label in zip(masks, mask_boxes(masks), labels):
            x0, y0, x1, y1 = (float(v) for v in box)
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": int(label),
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(m.sum()),
                                "segmentation": encode_mask(m), "iscrowd": 0})
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}
    if path is not None:
        import json
        with open(path, "w") as f:
            json.dump(coco, f)
    return coco


def coco_api(coco: dict):
    """pycocotools' COCO object over an annotation dict (no file)."""
    from pycocotools.coco import COCO
    import contextlib
    import io
    api = COCO()
    api.dataset = coco
    with contextlib.redirect_stdout(io.StringIO()):
        api.createIndex()
    return api
