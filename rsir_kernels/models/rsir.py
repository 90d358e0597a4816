"""The RSIR Transformer backbone (section 3.5, Figure 4): four stages of RSIR blocks.

Stage i works at 1/(4 * 2^i) of the input resolution with embed_dim * 2^i channels. A
patch-merging layer opens each stage: a 7x7 stride-4 convolution for stage 1, a 3x3
stride-2 convolution between stages (both followed by LayerNorm, as in CSWin, whose
configuration Table 2 follows). Global average pooling and a linear head classify.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from ..modules import RSIRBlock
from .config import RSIR_B, RSIR_T, RSIRConfig


class PatchMerging(nn.Module):
    """Strided convolution + LayerNorm: (B, H, W, Cin) or (B, Cin, H, W) -> (B, H/s, W/s, Cout)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding=(kernel - stride + 1) // 2)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class RSIRTransformer(nn.Module):
    """forward(images (B, in_chans, H, W)) -> logits (B, num_classes); H and W divisible by 32.

    forward_features returns the four stage maps (B, C_i, H / 2^(i+2), W / 2^(i+2)) for
    dense tasks (detection, segmentation).
    """

    def __init__(self, config: RSIRConfig = RSIR_T, generator: Optional[torch.Generator] = None):
        super().__init__()
        self.config = config
        dims = config.stage_dims()
        rates = torch.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        self.merges = nn.ModuleList([PatchMerging(config.in_chans, dims[0], 7, 4, channels_last=False)]
                                    + [PatchMerging(a, b, 3, 2) for a, b in zip(dims, dims[1:])])
        self.stages = nn.ModuleList()
        for i, (dim, depth, heads) in enumerate(zip(dims, config.depths, config.num_heads)):
            first = sum(config.depths[:i])
            self.stages.append(nn.Sequential(*(
                RSIRBlock(dim, heads, config.window_size, config.mlp_ratio, config.qkv_bias,
                          drop_path=rates[first + j], backend=config.backend, generator=generator,
                          recompute_qkv=config.recompute_qkv)
                for j in range(depth))))
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], config.num_classes) if config.num_classes else nn.Identity()
        self.apply(_init_weights)

    @property
    def feature_info(self) -> list[dict]:
        return [{"num_chs": d, "reduction": 4 * 2 ** i, "module": f"stages.{i}"}
                for i, d in enumerate(self.config.stage_dims())]

    def _check_size(self, images):
        if images.dim() != 4 or images.shape[1] != self.config.in_chans:
            raise ValueError(f"images must be (B, {self.config.in_chans}, H, W), got {tuple(images.shape)}")
        if images.shape[2] % 32 or images.shape[3] % 32:
            raise ValueError(f"image height and width must be divisible by 32, got {tuple(images.shape[2:])}")

    def forward_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        self._check_size(images)
        x, maps = images, []
        for merge, stage in zip(self.merges, self.stages):
            x = stage(merge(x))
            maps.append(x.permute(0, 3, 1, 2))
        return maps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check_size(images)
        x = images
        for merge, stage in zip(self.merges, self.stages):
            x = stage(merge(x))
        return self.head(self.norm(x.mean(dim=(1, 2))))


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def rsir_tiny(**overrides) -> RSIRTransformer:
    """RSIR-T: 64 channels, depths 2, 2, 16, 2, heads 4, 4, 8, 16 (Table 2).
    Keyword arguments override RSIRConfig fields; `generator` seeds RS-Win."""
    generator = overrides.pop("generator", None)
    return RSIRTransformer(dataclasses.replace(RSIR_T, **overrides), generator)


def rsir_base(**overrides) -> RSIRTransformer:
    """RSIR-B: 96 channels, depths 2, 4, 24, 2, heads 4, 8, 16, 32 (Table 2)."""
    generator = overrides.pop("generator", None)
    return RSIRTransformer(dataclasses.replace(RSIR_B, **overrides), generator)
