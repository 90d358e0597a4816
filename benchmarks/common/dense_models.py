"""The backbones + FPN that bench_dense.py compares, built alike: rsir_fpn_backbone for RSIR,
and timm's Swin-T features (NHWC) behind the same per-stage LayerNorm and the same
torchvision FeaturePyramidNetwork (RSIRBackboneWithFPN), so only the backbone differs."""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch
from torch import nn

from rsir_kernels.detection import rsir_fpn_backbone
from rsir_kernels.detection.backbone import RSIRBackboneWithFPN

SWIN = "swin_tiny_patch4_window7_224"


class SwinBody(nn.Module):
    """timm's Swin features_only model as RSIRBackbone's stand-in: NHWC maps -> LayerNorm ->
    NCHW, keys "0".."3" (what RSIRBackboneWithFPN reads: forward and `channels`)."""

    def __init__(self, features: nn.Module):
        super().__init__()
        self.model = features
        self.channels = features.feature_info.channels()
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in self.channels)

    def forward(self, images):
        return OrderedDict((str(k), norm(m).permute(0, 3, 1, 2).contiguous())
                           for k, (norm, m) in enumerate(zip(self.norms, self.model(images))))


def swin_fpn_backbone(height: int, width: int, sdpa: bool = True) -> RSIRBackboneWithFPN:
    """Swin-T at (height, width) with SDPA, any size: timm 1.0.31 needs strict_img_size=False (masks
    built per input size) and a PatchEmbed with dynamic_img_pad=True (else it asserts that
    H and W divide by the patch, 4; 1333 does not). No stochastic depth, as the RSIR rows."""
    import timm
    from timm.layers import PatchEmbed
    features = timm.create_model(SWIN, pretrained=False, features_only=True, img_size=(height, width),
                                 strict_img_size=False, drop_path_rate=0.0,
                                 embed_layer=functools.partial(PatchEmbed, dynamic_img_pad=True))
    for m in features.modules():       # timm's default for Swin is q @ k^T, softmax, @ v (experimental
        if hasattr(m, "fused_attn"):   # flag off): SDPA instead, the fastest attention torch offers
            m.fused_attn = sdpa        # it (FlopCounterMode counts no CPU flash kernel: sdpa=False)
    return RSIRBackboneWithFPN(SwinBody(features))


BODY = "body"    # a row name's suffix: the model's body alone (backbone + output norms, no FPN)


def _split(name: str) -> tuple[str, bool]:
    base, _, part = name.partition(" ")
    if part not in ("", BODY):
        raise ValueError(f"row {name!r}: the only part is {BODY!r}")
    return base, part == BODY


def build(name: str, height: int, width: int, device, seed: int = 0, sdpa: bool = True) -> nn.Module:
    """name: "swin" or an rsir_kernels backend ("cpp", "reference", "triton") for rsir_tiny,
    optionally followed by " body" (the body alone, without the FPN). The same seed for every
    RSIR backend: the same weights."""
    base, body_only = _split(name)
    torch.manual_seed(seed)
    if base == "swin":
        model = swin_fpn_backbone(height, width, sdpa)
    else:
        model = rsir_fpn_backbone("rsir_tiny", backend=base)
    return (model.body if body_only else model).to(device)


def describe(name: str) -> str:
    base, body_only = _split(name)
    model = SWIN if base == "swin" else f"rsir_tiny backend={base}"
    return f"{model}, body only (no FPN)" if body_only else f"{model} + FPN"


# Swin's attention leaves: SDPA's CPU flash kernels (no grad), else (the relative position bias
# needs a gradient) SDPA's math path: bmm and softmax, which Swin uses nowhere else.
SWIN_ATTENTION = ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                  "aten::_efficient_attention_forward", "aten::_efficient_attention_backward",
                  "aten::_flash_attention_forward", "aten::_flash_attention_backward",
                  "aten::bmm", "aten::_softmax", "aten::_softmax_backward_data")


def attention_ops(name: str) -> tuple[tuple, bool]:
    """(profiler names of the row's attention, whether to take their inclusive time). RSIR: the
    named ranges rsir_kernels.autograd_functions opens around the backend's forward and
    backward while a profiler runs, inclusive (the reference runs aten ops inside); Swin: the
    leaf kernels of SWIN_ATTENTION, self time (the mask add is left out)."""
    base, _ = _split(name)
    if base == "swin":
        return SWIN_ATTENTION, False
    return tuple(f"rsir::window_attention_{what} ({base})" for what in ("forward", "backward")), True
