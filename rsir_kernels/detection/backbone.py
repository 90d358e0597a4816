"""RSIR stage maps as torchvision's detection models take them, and the FPN on top.

RSIRBackbone: images (B, C, H, W) -> OrderedDict {"0": map of the first returned stage, ...},
each (B, C_i, ceil(H / s_i), ceil(W / s_i)) NCHW, s_i = 4 * 2^(i-1) for stage i, after a norm of
its own (LayerNorm over channels by default, as Swin's detection backbone adds one per returned
stage: the stages' outputs are un-normalised residual streams). The classification model's
own outputs do not change. RSIRBackboneWithFPN composes it with torchvision's
FeaturePyramidNetwork as torchvision's BackboneWithFPN does (`out_channels`, levels "0".."3"
and "pool" by default). Stages are numbered 1-4, as in the paper and torchvision's
returned_layers.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from ..models.rsir import BUILDERS, RSIRTransformer
from .weights import Weights, load_classification_weights

NUM_STAGES = 4


class RSIRBackbone(nn.Module):
    """The body: the RSIR model's stage maps, one norm on each returned stage.

    Args:
        model: an RSIRTransformer; stages after the last returned one, its classifier and its
            final norm are pruned (nothing left unused: DDP needs no find_unused_parameters).
        returned_stages: stage numbers in 1..4, ascending.
        trainable_stages: the last n stages train (0..4; None: all); the first 4 - n are frozen, the stem
            with stage 1: no gradients (requires_grad False) and always in eval mode, whatever
            train() says, so a frozen stage is a fixed function (fixed RS-Win orders, no
            stochastic depth), as FrozenBatchNorm2d makes a ResNet's. The output norms train.
        norm_layer: called with each returned stage's channels, applied to its channels-last
            (B, h, w, C_i) map; None: no norm.
    forward(images (B, C, H, W)) -> OrderedDict {str(k): (B, C_i, ceil(H / s_i), ceil(W / s_i))}
    for the k-th returned stage. `channels` lists the C_i.
    """

    def __init__(self, model: RSIRTransformer, returned_stages: Sequence[int] = (1, 2, 3, 4),
                 trainable_stages: Optional[int] = None,
                 norm_layer: Optional[Callable[[int], nn.Module]] = nn.LayerNorm):
        super().__init__()
        returned_stages = _check_returned_stages(returned_stages)
        _check_trainable_stages(trainable_stages)
        self._indices = [s - 1 for s in returned_stages]
        dims = model.config.stage_dims()
        model.prune_intermediate_layers(self._indices, prune_norm=True, prune_head=True)
        self.model = model
        self.channels = [dims[i] for i in self._indices]
        self.norms = nn.ModuleList(norm_layer(c) if norm_layer is not None else nn.Identity()
                                   for c in self.channels)
        frozen = 0 if trainable_stages is None else NUM_STAGES - trainable_stages
        self._frozen = [model.stem] if frozen else []
        self._frozen += [model.stages[i] for i in range(min(frozen, len(model.stages)))]
        for module in self._frozen:
            module.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        maps = self.model.forward_intermediates(images, indices=self._indices, output_fmt="NHWC",
                                                intermediates_only=True)
        return OrderedDict((str(k), norm(m).permute(0, 3, 1, 2).contiguous())
                           for k, (norm, m) in enumerate(zip(self.norms, maps)))


class RSIRBackboneWithFPN(nn.Module):
    """body (RSIRBackbone) then torchvision's FeaturePyramidNetwork: images (B, C, H, W) ->
    OrderedDict of (B, out_channels, h, w) maps, the body's keys then the extra block's ("pool":
    a stride-2 max pool of the last, ceil(H / 64) x ceil(W / 64) with all four stages).
    `out_channels` is what torchvision's detection models read."""

    def __init__(self, body: RSIRBackbone, out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_blocks is None else extra_blocks)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.fpn(self.body(images))


def rsir_fpn_backbone(name: str = "rsir_tiny", *, trainable_stages: Optional[int] = None,
                      returned_stages: Optional[Sequence[int]] = None,
                      norm_layer: Optional[Callable[[int], nn.Module]] = nn.LayerNorm,
                      weights: Optional[Weights] = None, out_channels: int = 256,
                      extra_blocks: Optional[ExtraFPNBlock] = None, **model_kwargs) -> RSIRBackboneWithFPN:
    """torchvision's resnet_fpn_backbone for an RSIR model: the FPN backbone its MaskRCNN and
    FasterRCNN take.

    Args:
        name: "rsir_micro", "rsir_tiny" or "rsir_base".
        trainable_stages: 0..4, the last n stages train (RSIRBackbone); None: all four, the
            fine-tuning of Swin that the paper follows.
        returned_stages: stage numbers in 1..4 (default all), ascending: the FPN's inputs.
        norm_layer: the norm on each returned stage (RSIRBackbone); None: none.
        weights: a classification checkpoint of rsir_kernels.train (a path or its dict) or a
            state dict: load_classification_weights, which refuses a mismatch.
        out_channels, extra_blocks: the FPN's (default 256 and LastLevelMaxPool, as torchvision's).
        model_kwargs: the RSIR model's (RSIRConfig fields: backend="cpp", drop_path_rate=0.2,
            window_size, ...); num_classes is 0 (no classifier).
    ValueError naming the argument for an unknown name, trainable_stages or returned_stages.
    """
    if name not in BUILDERS:
        raise ValueError(f"name={name!r}: not an RSIR model; one of {', '.join(BUILDERS)}")
    _check_trainable_stages(trainable_stages)
    returned_stages = _check_returned_stages((1, 2, 3, 4) if returned_stages is None else returned_stages)
    model = BUILDERS[name](**dict(model_kwargs, num_classes=0))
    if weights is not None:
        load_classification_weights(model, weights, name)
    body = RSIRBackbone(model, returned_stages, trainable_stages, norm_layer)
    return RSIRBackboneWithFPN(body, out_channels, extra_blocks)


def _check_trainable_stages(value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                              or not 0 <= value <= NUM_STAGES):
        raise ValueError(f"trainable_stages must be an int in 0..{NUM_STAGES} (the last n stages train), "
                         f"got {value!r}")


def _check_returned_stages(stages) -> list[int]:
    stages = list(stages)
    if (not stages or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= NUM_STAGES for s in stages)
            or stages != sorted(set(stages))):
        raise ValueError(f"returned_stages must be distinct stage numbers in 1..{NUM_STAGES}, ascending, "
                         f"got {stages!r}")
    return stages
