"""Datasets and loaders: scikit-learn's digits, an ImageFolder tree, or random images.

Every loader is sharded by a DistributedSampler (also with one process, so the order of a
run depends on (seed, epoch) only and a resumed run replays it, from any step of an epoch:
ResumableSampler). Random augmentations of an item are drawn from a seed of (seed, epoch, item)
(SeededItems), so they do not depend on the loader workers, the ranks or where a run resumed.
Evaluation shards the validation set without padding (rank r takes items r, r + world, ...),
so the all-reduced counts are exact.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset

from .errors import TrainError

DIGITS_SIZE = 32  # digits' 8x8 images are upsampled to 32x32: stage maps 8x8 down to 1x1


@dataclasses.dataclass
class Data:
    """train/val datasets of (image (C, H, W) float, label int) and what the model must match."""
    train: Dataset
    val: Dataset
    num_classes: int
    in_chans: int
    input_size: tuple  # (C, H, W)
    class_names: list | None = None  # ImageFolder's folder names, index = label


def digits(seed: int = 0) -> Data:
    """scikit-learn's 1,797 handwritten digits (bundled, no download): a stratified 80/20 split
    (random_state=seed), 8x8 -> 32x32 bilinear, pixels 0..16 scaled to [-1, 1], one channel."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8)
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, val_idx = train_test_split(range(len(labels)), test_size=0.2, stratify=bunch.target,
                                          random_state=seed)
    train_idx, val_idx = torch.tensor(train_idx), torch.tensor(val_idx)
    return Data(TensorDataset(images[train_idx], labels[train_idx]),
                TensorDataset(images[val_idx], labels[val_idx]),
                num_classes=10, in_chans=1, input_size=(1, DIGITS_SIZE, DIGITS_SIZE))


def fake(input_size: tuple, num_classes: int, train_items: int = 2048, val_items: int = 256) -> Data:
    """Random images of input_size (C, H, W) and random labels: for throughput runs without a
    dataset (the same images every call: a fixed seed)."""
    g = torch.Generator().manual_seed(0)
    def make(n):
        return TensorDataset(torch.randn(n, *input_size, generator=g),
                             torch.randint(0, num_classes, (n,), generator=g))
    return Data(make(train_items), make(val_items), num_classes, input_size[0], tuple(input_size))


def _load_image(path: str):
    """PIL loader that names the file when it cannot be read (a worker's bare PIL error does not)."""
    from PIL import Image
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:  # PIL raises several types for a bad file: report them all the same way
        raise TrainError(f"cannot read image {path}: {e}") from e


def image_folder(root: str, pretrained_cfg: dict, *, auto_augment: str | None = None, reprob: float = 0.0) -> Data:
    """ImageNet's layout: root/train/<class>/*, root/val/<class>/*. Training: random resized crop
    and flip (RandAugment with auto_augment, e.g. "rand-m9-mstd0.5-inc1"; random erasing with
    probability reprob: augment.train_transform); eval: resize and center crop, both at
    pretrained_cfg's input_size, mean, std, crop_pct and interpolation."""
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    from .augment import train_transform

    image_folder_classes(root)
    common = dict(input_size=pretrained_cfg["input_size"], mean=pretrained_cfg["mean"],
                  std=pretrained_cfg["std"], interpolation=pretrained_cfg.get("interpolation", "bicubic"))
    train_tf = train_transform(pretrained_cfg, auto_augment, reprob)
    val_tf = create_transform(is_training=False, crop_pct=pretrained_cfg.get("crop_pct", 0.875), **common)
    sets = {}
    for split, tf in (("train", train_tf), ("val", val_tf)):
        folder = os.path.join(root, split)
        try:
            sets[split] = ImageFolder(folder, transform=tf, loader=_load_image)
        except FileNotFoundError as e:  # an empty class folder, or no class folder at all
            raise TrainError(f"--data {root}: {e}") from e
    return Data(sets["train"], sets["val"], len(sets["train"].classes), pretrained_cfg["input_size"][0],
                tuple(pretrained_cfg["input_size"]), list(sets["train"].classes))


def image_folder_classes(root: str) -> list[str]:
    """The class names of root/train, after checking ImageNet's layout: TrainError naming a
    missing split folder, or the first class folder without an image file (it looks for one
    image per class, not through the whole tree)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS
    names = {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise TrainError(f"--data {root}: no folder {folder} "
                             f"(expected ImageNet's layout: train/<class>/*, val/<class>/*)")
        names[split] = sorted(e.name for e in os.scandir(folder) if e.is_dir())
        if not names[split]:
            raise TrainError(f"{folder}: no class folders")
        for name in names[split]:
            path = os.path.join(folder, name)
            if not any(f.lower().endswith(IMG_EXTENSIONS) for _, _, files in os.walk(path) for f in files):
                raise TrainError(f"{path}: empty class folder (no {', '.join(IMG_EXTENSIONS)} file)")
    if names["train"] != names["val"]:
        raise TrainError(f"--data {root}: train and val have different class folders")
    return names["train"]


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch past its first `skip` items (this rank's):
    a run resumed mid-epoch takes the rest of the epoch's order. Rank r's item p is global
    position r + p * world, so skipping step * batch_per_rank items per rank skips the same
    global batches at any world size."""
    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(self.num_samples - self.skip, 0)


class SeededItems(Dataset):
    """dataset[i] with torch's, numpy's and python's RNGs seeded from (seed, epoch, i) for the
    call (and put back after: with no loader workers the calls run in the trainer's process),
    so an item's random augmentation does not depend on which worker loads it or after what."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item_seed = int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1, dtype=np.uint64)[0])
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        torch.default_generator.manual_seed(item_seed)  # the CPU's only: torch.manual_seed reseeds CUDA too
        random.seed(item_seed)
        np.random.seed(item_seed % 2 ** 32)
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def train_loader(dataset: Dataset, batch_per_rank: int, rank: int, world: int, seed: int,
                 workers: int, seeded_items: bool = False) -> DataLoader:
    """Shuffled, sharded, drop_last (every step sees a full global batch); call
    loader.sampler.set_epoch(epoch) (and loader.dataset.set_epoch with seeded_items) before
    each epoch, and set loader.sampler.skip to start it mid-way. seeded_items: the dataset's
    random transforms seeded per item (SeededItems). The loader draws its workers' seeds from a
    generator of its own, so iterating it leaves torch's global RNG (RS-Win draws, drop path,
    mixup) alone; workers outlive a job's SIGTERM/SIGUSR1 (preempt.worker_init_fn)."""
    from .preempt import worker_init_fn
    if seeded_items:
        dataset = SeededItems(dataset, seed)
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    return DataLoader(dataset, batch_size=batch_per_rank, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator().manual_seed(seed),
                      worker_init_fn=worker_init_fn() if workers else None)


def eval_loader(dataset: Dataset, batch_per_rank: int, rank: int, world: int, workers: int) -> DataLoader:
    """Rank r gets items r, r + world, ...: every item exactly once over the ranks, no padding."""
    shard = Subset(dataset, range(rank, len(dataset), world))
    return DataLoader(shard, batch_size=batch_per_rank, shuffle=False, num_workers=workers)


def subset(dataset: Dataset, items: int | None) -> Dataset:
    """The first `items` items (all when None): small runs for tests and smoke checks."""
    return dataset if items is None or items >= len(dataset) else Subset(dataset, range(items))


def fingerprint(data: Data, name: str) -> dict:
    """What identifies the data of a run wherever it lives: the class names, the item counts and
    a sha256 of the items' paths relative to the tree (ImageFolder's listing, no file read);
    for digits and fake data their name and counts. Compared on --resume (resume.check_data)."""
    items = {"train_items": len(data.train), "val_items": len(data.val)}
    if name in ("digits", "fake"):
        return {"data": name, "classes": data.num_classes, **items}
    h = hashlib.sha256()
    for split in (data.train, data.val):
        for path, label in split.samples:
            h.update(f"{os.path.relpath(path, os.path.dirname(split.root))}\t{label}\n".encode())
    return {"data": "image_folder", "classes": list(data.class_names), **items, "files": h.hexdigest()}
