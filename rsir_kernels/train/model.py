"""Builds a registered RSIR model by name through timm (importing rsir_kernels registers them)."""
from __future__ import annotations

import dataclasses

from torch import nn

from .errors import TrainError

MODEL_NAMES = ("rsir_micro", "rsir_tiny", "rsir_base")

# Used only while a name is not registered with timm: the same configurations, built directly.
_LOCAL_CONFIGS = {"rsir_micro": dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8))}
_IMAGENET_CFG = dict(input_size=(3, 224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     crop_pct=0.875, interpolation="bicubic")


def create_model(name: str, *, num_classes: int, in_chans: int, drop_path_rate: float = 0.0,
                 backend: str = "auto", window_size: int | None = None,
                 recompute_qkv: bool = False) -> nn.Module:
    """timm.create_model(name, ...) for an RSIR name; raises TrainError naming the known ones."""
    import timm

    import rsir_kernels  # noqa: F401  registers the RSIR models with timm

    if name not in MODEL_NAMES:
        raise TrainError(f"--model {name!r} is not an RSIR model; choose one of {', '.join(MODEL_NAMES)}")
    kwargs = dict(num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate,
                  backend=backend, recompute_qkv=recompute_qkv)
    if window_size is not None:
        kwargs["window_size"] = window_size
    if timm.is_model(name):
        return timm.create_model(name, pretrained=False, **kwargs)
    return _create_local(name, **kwargs)


def _create_local(name: str, **overrides) -> nn.Module:
    from ..models import RSIR_T, RSIRTransformer, rsir_base, rsir_tiny
    if name == "rsir_tiny":
        model = rsir_tiny(**overrides)
    elif name == "rsir_base":
        model = rsir_base(**overrides)
    else:
        model = RSIRTransformer(dataclasses.replace(RSIR_T, **_LOCAL_CONFIGS[name], **overrides))
    model.pretrained_cfg = dict(_IMAGENET_CFG)
    return model


def pretrained_cfg(model: nn.Module) -> dict:
    """The model's data config (input_size, mean, std, crop_pct, interpolation)."""
    cfg = dict(_IMAGENET_CFG)
    cfg.update({k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items()
                if k in _IMAGENET_CFG and v is not None})
    return cfg
