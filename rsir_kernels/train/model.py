"""Builds a registered RSIR model by name through timm (importing rsir_kernels registers them)."""
from __future__ import annotations

from torch import nn

from ..models.config import MODEL_NAMES
from .errors import TrainError

_DATA_KEYS = ("input_size", "mean", "std", "crop_pct", "interpolation")


def create_model(name: str, *, num_classes: int, in_chans: int, drop_path_rate: float = 0.0,
                 backend: str = "auto", window_size: int | None = None,
                 recompute_qkv: bool = False) -> nn.Module:
    """timm.create_model(name, ...) for an RSIR name; TrainError naming the known ones otherwise.
    window_size None keeps the model's (7)."""
    import timm

    import rsir_kernels  # noqa: F401  registers the RSIR models with timm

    if name not in MODEL_NAMES or not timm.is_model(name):
        raise TrainError(f"--model {name!r} is not a registered RSIR model; choose one of {', '.join(MODEL_NAMES)}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                  backend=backend, recompute_qkv=recompute_qkv)
    if window_size is not None:
        kwargs["window_size"] = window_size
    return timm.create_model(name, pretrained=False, **kwargs)


def pretrained_cfg(model: nn.Module) -> dict:
    """The model's data settings: input_size (C, H, W), mean, std, crop_pct, interpolation."""
    cfg = dict(model.pretrained_cfg)
    return {k: cfg[k] for k in _DATA_KEYS}
