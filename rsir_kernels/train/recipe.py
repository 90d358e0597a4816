"""The paper's recipe (section 4.1, following Swin): AdamW, lr 1e-3 per 256 images, weight
decay 0.05 (none on biases, norms and no_weight_decay() parameters), cosine schedule after a
linear warmup (20 of 300 epochs), label smoothing 0.1; mixup/cutmix as options."""
from __future__ import annotations

import torch
from torch import nn

BASE_LR, BASE_BATCH = 1e-3, 256
WARMUP_FRACTION = 20 / 300  # the paper's 20 warmup epochs of 300


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
