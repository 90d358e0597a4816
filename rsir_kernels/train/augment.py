"""Image augmentations of the recipe, from timm: the training transform (RandAugment, random
erasing) and random erasing on tensor batches.

timm's RandAugment "inc1" posterize keeps 4 - int(magnitude * 0.4) bits: 0 bits at magnitude 10
(reached by rand-m9-mstd0.5's Gaussian draws), which Pillow >= 11 refuses ("bits must be between
or equal to 1 and 8") where older Pillow returned a black image. posterize() below returns that
black image, so the paper's string trains as it did on the Pillow of its time.
"""
from __future__ import annotations

from PIL import Image, ImageOps

ERASE_MODE, ERASE_COUNT = "pixel", 1  # Swin's random erasing: per-pixel normal noise, one region


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's posterize, with 0 bits kept giving the black image older Pillow gave (every
    value masked to 0) instead of Pillow's ValueError."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def fix_posterize(transform):
    """The transform with every RandAugment/AutoAugment posterize op using posterize() above
    (in place; returned for chaining)."""
    for t in getattr(transform, "transforms", [transform]):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def train_transform(pretrained_cfg: dict, randaugment: str | None, reprob: float):
    """timm's training transform at pretrained_cfg's size, mean, std and interpolation: random
    resized crop, flip, RandAugment `randaugment` (None: off), random erasing with probability
    reprob (Swin's mode and count), the posterize case fixed."""
    from timm.data import create_transform
    return fix_posterize(create_transform(
        input_size=pretrained_cfg["input_size"], is_training=True, auto_augment=randaugment,
        interpolation=pretrained_cfg.get("interpolation", "bicubic"), mean=pretrained_cfg["mean"],
        std=pretrained_cfg["std"], re_prob=reprob, re_mode=ERASE_MODE, re_count=ERASE_COUNT))


def batch_eraser(reprob: float, device):
    """timm's RandomErasing over a batch of tensors (each image erased with probability reprob),
    for tensor data whose loader has no transform; None when reprob is 0."""
    if reprob <= 0:
        return None
    from timm.data.random_erasing import RandomErasing
    return RandomErasing(reprob, mode=ERASE_MODE, max_count=ERASE_COUNT, device=device)
