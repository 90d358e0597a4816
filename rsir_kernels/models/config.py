"""Configurations of the RSIR Transformer variants (Table 2 of the paper), and VARIANTS: the one
table of model names that the builders, timm's registry, from_checkpoint, the detection
backbone and the trainer read."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass(frozen=True)
class RSIRConfig:
    embed_dim: int = 64                      # channels of stage 1; doubled at each stage
    depths: tuple = (2, 2, 16, 2)            # blocks per stage
    num_heads: tuple = (4, 4, 8, 16)         # heads per stage
    rs_heads: Optional[Union[int, tuple]] = None  # RS-Win heads (the rest IR-Win): None = half of
                                             # each stage's (Table 2), an int for every layer, or one per stage
    window_size: int = 7                     # windows of 7 x 7 = 49 tokens
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_path_rate: float = 0.0              # stochastic depth, linear over the blocks
    in_chans: int = 3
    num_classes: int = 1000                  # 0: no classifier, forward returns pooled features
    global_pool: str = "avg"                 # "avg", or "": no pooling (forward returns the map)
    drop_rate: float = 0.0                   # dropout before the classifier
    backend: str = "auto"                    # window_attention backend
    recompute_qkv: bool = False              # RSIRAttention(recompute_qkv=...): less memory, more compute
    rs_eval: str = "fixed"                   # RS-Win in eval: "fixed" orders, or "random" draws
    rs_seed: int = 0                         # the fixed eval orders derive from it, per layer

    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2 ** i for i in range(len(self.depths))]

    def stage_rs_heads(self) -> list[int]:
        """RS-Win heads of each stage's layers; ValueError naming rs_heads if one is out of range."""
        if self.rs_heads is None:
            return [heads // 2 for heads in self.num_heads]
        per_stage = [self.rs_heads] * len(self.num_heads) if isinstance(self.rs_heads, int) else list(self.rs_heads)
        if len(per_stage) != len(self.num_heads):
            raise ValueError(f"rs_heads={self.rs_heads!r} must be an int or have one entry per stage "
                             f"({len(self.num_heads)})")
        for stage, (rs, heads) in enumerate(zip(per_stage, self.num_heads)):
            if isinstance(rs, bool) or not isinstance(rs, int) or not 0 <= rs <= heads:
                raise ValueError(f"rs_heads={self.rs_heads!r}: stage {stage} has {heads} heads, so its RS-Win "
                                 f"heads must be in 0..{heads}, got {rs!r}")
        return per_stage


RSIR_T = RSIRConfig()
RSIR_B = RSIRConfig(embed_dim=96, depths=(2, 4, 24, 2), num_heads=(4, 8, 16, 32))
# Not in the paper: a small variant for tests and demos.
RSIR_MICRO = RSIRConfig(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8))



@dataclasses.dataclass(frozen=True)
class Variant:
    """A named model: its configuration, and what the paper (or the recipe for it) gives."""
    config: RSIRConfig
    # --recipe paper's stochastic depth: Swin-T's 0.2 for RSIR-T, Swin-B's 0.5 for RSIR-B (the
    # paper sets them beside each other); rsir_micro (5 blocks) 0.1, as DeiT-S and smaller take
    paper_drop_path: float
    # (parameters, multiply-adds at 224x224) as Tables 2 and 3 give them; None: not in the paper
    paper_figures: Optional[tuple] = None


VARIANTS = {
    "rsir_micro": Variant(RSIR_MICRO, paper_drop_path=0.1),
    "rsir_tiny": Variant(RSIR_T, paper_drop_path=0.2, paper_figures=(22e6, 5.0e9)),
    "rsir_base": Variant(RSIR_B, paper_drop_path=0.5, paper_figures=(85e6, 16.3e9)),
}
MODEL_NAMES = tuple(VARIANTS)
PAPER_FIGURES = {name: v.paper_figures for name, v in VARIANTS.items() if v.paper_figures is not None}
