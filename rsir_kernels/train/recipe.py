"""The paper's recipe (section 4.1, following Swin): AdamW, lr 1e-3 per 256 images, weight
decay 0.05 (none on biases, norms and no_weight_decay() parameters), cosine schedule after a
linear warmup (20 of 300 epochs), label smoothing 0.1; with --recipe paper also Swin's
augmentation and regularization (PAPER)."""
from __future__ import annotations

import torch
from torch import nn

from ..models.config import VARIANTS

BASE_LR, BASE_BATCH = 1e-3, 256
WARMUP_FRACTION = 20 / 300  # the paper's 20 warmup epochs of 300

# Without --recipe: the optimizer's recipe only (label smoothing as the paper), no augmentation.
PLAIN = {"randaugment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "label_smoothing": 0.1, "drop_path": 0.0,
         "clip_grad": None, "model_ema": None}
# --recipe paper: "mostly follows Swin" (section 4.1), i.e. Swin's config (mixup and cutmix
# switched per batch with probability 0.5: timm Mixup's defaults); Swin has EMA off.
PAPER = {"randaugment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25, "label_smoothing": 0.1,
         "clip_grad": 5.0, "model_ema": None}
# Stochastic depth per model (models/config.py says why each).
PAPER_DROP_PATH = {name: variant.paper_drop_path for name, variant in VARIANTS.items()}
TENSOR_SKIPPED = ("randaugment",)  # needs PIL images: not applied to digits or fake data


def resolve(args) -> list[str]:
    """Fills args' recipe options left at None from --recipe (or PLAIN); returns the options
    given but not applied (RandAugment on tensor data). --clip-grad 0 and --randaugment none
    turn those off under --recipe paper."""
    chosen = dict(PAPER, drop_path=PAPER_DROP_PATH[args.model]) if args.recipe == "paper" else PLAIN
    for name, value in chosen.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.clip_grad == 0:
        args.clip_grad = None
    if args.randaugment in ("none", ""):
        args.randaugment = None
    return [n for n in TENSOR_SKIPPED if getattr(args, n) and args.data in ("digits", "fake")]


def summary(args, skipped: list[str]) -> str:
    """The banner's line of augmentation and regularization, as resolved."""
    parts = [f"randaugment {args.randaugment or 'off'}", f"mixup {args.mixup:g}", f"cutmix {args.cutmix:g}",
             f"random erasing {args.reprob:g}", f"label smoothing {args.label_smoothing:g}",
             f"drop path {args.drop_path:g}", f"clip-grad {args.clip_grad or 'off'}",
             f"EMA {args.model_ema or 'off'}"]
    line = f"recipe {args.recipe or 'default'}: " + ", ".join(parts)
    if skipped:
        line += f"; skipped on tensor data (needs images): {', '.join(skipped)}"
    return line


def scaled_lr(lr: float | None, global_batch: int) -> float:
    """lr as given, or the paper's 1e-3 scaled linearly with the global batch (per 256 images)."""
    return lr if lr is not None else BASE_LR * global_batch / BASE_BATCH


def warmup_epochs(warmup: float | None, epochs: int) -> float:
    """warmup as given, or the paper's share of the run (20 of 300 epochs): 2 of 30."""
    return warmup if warmup is not None else epochs * WARMUP_FRACTION


def optimizer(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.Optimizer:
    """AdamW through timm: no decay on 1-D parameters (biases, norms) and model.no_weight_decay()."""
    from timm.optim import create_optimizer_v2
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay, filter_bias_and_bn=True)


def scheduler(opt: torch.optim.Optimizer, lr: float, total_steps: int, warmup_steps: int):
    """Per-step cosine from lr to lr/100 over the whole run; the first warmup_steps rise
    linearly from lr/1000 (Swin's ratios). Call .step_update(step) before each step."""
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(opt, t_initial=max(total_steps, 1), lr_min=lr / 100, warmup_t=warmup_steps,
                             warmup_lr_init=lr / 1000, warmup_prefix=False, t_in_epochs=False)


def train_loss(label_smoothing: float, soft_targets: bool) -> nn.Module:
    """Cross-entropy with label smoothing; on mixed soft targets (mixup/cutmix, which smooth the
    labels themselves) the soft-target cross-entropy."""
    if soft_targets:
        from timm.loss import SoftTargetCrossEntropy
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)


def mixup(mixup_alpha: float, cutmix_alpha: float, label_smoothing: float, num_classes: int):
    """timm's Mixup (batch-wise mixup and/or cutmix) or None when both alphas are 0."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return None
    from timm.data import Mixup
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, label_smoothing=label_smoothing,
                 num_classes=num_classes)
