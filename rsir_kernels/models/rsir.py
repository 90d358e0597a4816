"""The RSIR Transformer backbone (section 3.5, Figure 4): four stages of RSIR blocks.

Stage i works at 1/(4 * 2^i) of the input resolution with embed_dim * 2^i channels. A
patch-merging layer opens each stage: a 7x7 stride-4 convolution for stage 1 (the stem), a
3x3 stride-2 convolution between stages (both followed by LayerNorm, as in CSWin, whose
configuration Table 2 follows). A final LayerNorm, global average pooling and a linear head
classify (CSWin's order: norm, then pool).

Any input size: stage i's map has ceil(H / s) x ceil(W / s) cells, s = 4 * 2^i. The image is
padded with zero rows and columns at the bottom and right to a multiple of the stem's stride
(at most 3; none when H and W are multiples of 4), which is the stem convolution's own zero
border made one-sided; the stride-2 merges give ceil(n / 2) for any n, and the attention needs
no whole number of windows (the windows of a map that has none are runs of window^2 tokens of
the order, the last one partial: samplers.window_order). So no token is padding: every token
covers image pixels, and nothing is cropped (docs/design.md section 13).

The model follows timm's model API (the meanings of timm's Swin and MaxViT): forward_features
returns the last stage's unpooled map, forward_head pools and classifies, forward_intermediates
returns the stage maps; see RSIRTransformer.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.fx
import torch.utils.checkpoint
from torch import nn
from torch.fx.experimental.symbolic_shapes import has_static_value

from .. import routing
from ..modules import RSIRBlock
from ..samplers import layer_seed
from .config import MODEL_NAMES, RSIR_T, VARIANTS, RSIRConfig

GLOBAL_POOLS = ("avg", "")
OUTPUT_FORMATS = ("NCHW", "NHWC")
PAPER_ID = "arXiv:2304.06250"
STEM_STRIDE = 4


def default_cfg(**overrides) -> dict:
    """timm's pretrained_cfg fields for an RSIR model (no weights exist: no url/file/hub id).
    Data settings are Swin's and CSWin's ImageNet ones, which the paper's training follows."""
    return {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
            "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
            "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "first_conv": "stem.conv", "classifier": "head.fc", "license": None,
            "paper_ids": PAPER_ID, "origin_url": "https://arxiv.org/abs/2304.06250",
            "paper_name": "RSIR Transformer: Hierarchical Vision Transformer using Random "
                          "Sampling Windows and Important Region Windows", **overrides}


def feature_take_indices(num_stages: int, indices: Union[None, int, Sequence[int]]) -> tuple[list[int], int]:
    """timm's meaning of `indices`: None -> all stages, an int n -> the last n, a sequence ->
    those (negative ones count from the end). Returns (sorted absolute indices, the largest)."""
    if indices is None:
        indices = num_stages
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} (the last n stages) must be in 1..{num_stages}")
        take = list(range(num_stages - indices, num_stages))
    else:
        take = sorted(num_stages + i if i < 0 else i for i in indices)
        if not take or take[0] < 0 or take[-1] >= num_stages:
            raise ValueError(f"indices={tuple(indices)} must name stages in "
                             f"{-num_stages}..{num_stages - 1}")
    return take, take[-1]


def pad_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H', W'), H' and W' the next multiples of `multiple`, with zero rows
    and columns at the bottom and right; `images` itself when nothing is missing."""
    pad_h, pad_w = -images.shape[2] % multiple, -images.shape[3] % multiple
    if isinstance(pad_h, torch.Tensor):  # torch.jit.trace records sizes as tensors; a trace holds one size
        pad_h, pad_w = int(pad_h), int(pad_w)
    # symbolic sizes (compile / export with dynamic shapes) pad whatever the amounts, 0 included:
    # a branch on them would guard on H % multiple and W % multiple, and compile again for sizes
    # on the other side
    if not (has_static_value(pad_h) and has_static_value(pad_w)) or pad_h or pad_w:
        return nn.functional.pad(images, (0, pad_w, 0, pad_h))
    return images


# FX tracing (timm's and torchvision's feature extraction) keeps it as one call: its branch
# reads the input's size, which a symbolic trace does not have
torch.fx.wrap("pad_to_multiple")


class PatchMerging(nn.Module):
    """Strided convolution + LayerNorm: (B, H, W, Cin) or (B, Cin, H, W) -> (B, H', W', Cout),
    H' = floor((H + 2p - k) / s) + 1: ceil(H / 2) for the 3x3 stride-2 merges at any H, H / 4 for
    the 7x7 stride-4 stem at a multiple of 4 (RSIRTransformer.embed pads to one)."""

    def __init__(self, in_dim: int, out_dim: int, kernel: int, stride: int, channels_last: bool = True):
        super().__init__()
        self.channels_last = channels_last
        self.conv = nn.Conv2d(in_dim, out_dim, kernel, stride, padding=(kernel - stride + 1) // 2)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        if self.channels_last:
            x = x.permute(0, 3, 1, 2)
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


class RSIRStage(nn.Module):
    """downsample (a stride-2 PatchMerging; Identity for stage 1, after the stem) then RSIR
    blocks: (B, H, W, Cin) -> (B, H', W', dim), channels last.

    With grad_checkpointing each block is recomputed in the backward; its RS-Win order is drawn
    before the checkpoint and passed in, so the recomputation sees the same windows (a
    generator's state is not restored by torch.utils.checkpoint).
    """

    def __init__(self, in_dim: Optional[int], dim: int, depth: int, num_heads: int, config: RSIRConfig,
                 drop_path: Sequence[float], seeds: Sequence[int],
                 generator: Optional[torch.Generator] = None, rs_heads: Optional[int] = None):
        super().__init__()
        self.downsample = nn.Identity() if in_dim is None else PatchMerging(in_dim, dim, 3, 2)
        self.blocks = nn.Sequential(*(
            RSIRBlock(dim, num_heads, config.window_size, config.mlp_ratio, config.qkv_bias,
                      drop_path=drop_path[j], rs_heads=rs_heads, backend=config.backend, generator=generator,
                      recompute_qkv=config.recompute_qkv, rs_eval=config.rs_eval, seed=seeds[j])
            for j in range(depth)))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if not (self.grad_checkpointing and routing.grad_enabled()):
            return self.blocks(x)
        batch, height, width, _ = x.shape
        for block in self.blocks:
            order = block.attn.rs_order(batch, height, width, x.device) if block.attn.rs_heads else None
            x = torch.utils.checkpoint.checkpoint(block, x, order, use_reentrant=False)
        return x


class ClassifierHead(nn.Module):
    """(B, H, W, C) -> global average pool -> dropout -> linear: (B, num_classes).

    global_pool="" skips the pooling ((B, H, W, num_classes) out); num_classes=0 has no linear
    layer (features out).
    """

    def __init__(self, in_features: int, num_classes: int, global_pool: str = "avg", drop_rate: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, global_pool)

    def reset(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
            self.global_pool = global_pool
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)


class RSIRTransformer(nn.Module):
    """forward(images (B, in_chans, H, W)) -> logits (B, num_classes); any H, W >= 1.

    timm's model API: forward_features(images) -> (B, ceil(H/32), ceil(W/32), num_features), the last
    stage's unpooled map after the final norm, channels last (output_fmt "NHWC", as timm's
    Swin); forward_head(map, pre_logits=False) -> logits, or the pooled (B, head_hidden_size)
    features with pre_logits; forward_intermediates(images, indices) -> the stage maps
    (B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) for dense tasks; feature_info, get_classifier,
    reset_classifier, set_grad_checkpointing, no_weight_decay, group_matcher,
    prune_intermediate_layers.

    Args:
        config: the RSIRConfig; keyword overrides replace its fields
            (RSIRTransformer(RSIR_T, num_classes=10) == RSIRTransformer(replace(RSIR_T, num_classes=10))).
        generator: seeds RS-Win's training draws (RSIRAttention's `generator`).
    config.rs_heads gives each layer's RS-Win heads, the others IR-Win (None: half of each
    stage's, as Table 2). Eval mode uses each layer's fixed RS-Win order, derived from
    config.rs_seed and the layer's position (RSIRAttention's rs_eval="fixed"), unless
    config.rs_eval == "random".
    """

    output_fmt = "NHWC"

    def __init__(self, config: RSIRConfig = RSIR_T, generator: Optional[torch.Generator] = None,
                 **overrides):
        super().__init__()
        config = dataclasses.replace(config, **overrides) if overrides else config
        if config.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {config.global_pool!r}")
        if len(config.depths) != len(config.num_heads):
            raise ValueError(f"depths {config.depths} and num_heads {config.num_heads} must have one "
                             "entry per stage")
        if isinstance(config.rs_heads, list):  # e.g. from a JSON file: a tuple, as the other fields
            config = dataclasses.replace(config, rs_heads=tuple(config.rs_heads))
        config.stage_rs_heads()  # validates rs_heads before anything is built
        self.config = config
        dims = config.stage_dims()
        blocks = sum(config.depths)
        # stochastic depth linear over the blocks; plain floats so that a meta-device build works
        rates = [config.drop_path_rate * i / max(blocks - 1, 1) for i in range(blocks)]
        self.stem = PatchMerging(config.in_chans, dims[0], 7, 4, channels_last=False)
        stages, first = [], 0
        for i, (dim, depth, heads, rs_heads) in enumerate(zip(dims, config.depths, config.num_heads,
                                                              config.stage_rs_heads())):
            positions = range(first, first + depth)
            stages.append(RSIRStage(dims[i - 1] if i else None, dim, depth, heads, config,
                                    rates[first:first + depth],
                                    [layer_seed(config.rs_seed, p) for p in positions], generator, rs_heads))
            first += depth
        self.stages = nn.Sequential(*stages)
        self.num_classes = config.num_classes
        self.num_features = self.head_hidden_size = dims[-1]
        self.feature_info = [{"num_chs": d, "reduction": 4 * 2 ** i, "module": f"stages.{i}"}
                             for i, d in enumerate(dims)]
        self.norm = nn.LayerNorm(dims[-1])
        self.head = ClassifierHead(dims[-1], config.num_classes, config.global_pool, config.drop_rate)
        self.pretrained_cfg = self.default_cfg = default_cfg(num_classes=config.num_classes)
        # A window has no parameters: this buffer puts its size in the state dict, so that
        # weights trained with one window refuse a model built with another.
        self.register_buffer("window_size", torch.tensor(config.window_size), persistent=True)
        self._register_load_state_dict_pre_hook(_check_window_size, with_module=True)
        self.apply(_init_weights)
        _match_gradient_strides(self)

    @torch.no_grad()
    def init_weights(self):
        """(Re)initialises every parameter: each layer's own reset, then truncated-normal linear
        weights. Use after a meta-device build and to_empty()."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.window_size.fill_(self.config.window_size)  # to_empty() left it undefined
        self.apply(_init_weights)

    def _check_size(self, images):
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():  # shapes are proxies there
            return
        if images.dim() != 4 or images.shape[1] != self.config.in_chans or 0 in images.shape[2:]:
            raise ValueError(f"images must be (B, {self.config.in_chans}, H, W) with H, W >= 1, "
                             f"got {tuple(images.shape)}")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The stem: (B, in_chans, H, W) -> (B, ceil(H/4), ceil(W/4), embed_dim), channels last.
        Zero rows / columns at the bottom and right bring H and W to multiples of 4 (see the
        module docstring); at multiples of 4 the image goes in as it is."""
        return self.stem(pad_to_multiple(images, STEM_STRIDE))

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, ceil(H/32), ceil(W/32), num_features): normed, unpooled."""
        self._check_size(images)
        return self.norm(self.stages(self.embed(images)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """forward_features' map -> logits, or the pooled features with pre_logits."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(images))

    def forward_intermediates(self, images: torch.Tensor, indices: Union[None, int, Sequence[int]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The stage maps named by `indices` (None: all; n: the last n; or a list), each
        (B, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) in NCHW, or channels last with output_fmt="NHWC".
        norm=True applies the final norm to the last stage's map. Returns the list with
        intermediates_only, else (forward_features' output, the list)."""
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {output_fmt!r}")
        self._check_size(images)
        take, last = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:last + 1] if stop_early or intermediates_only else self.stages
        x, intermediates = self.embed(images), []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                out = self.norm(x) if norm and i == len(self.stages) - 1 else x
                intermediates.append(out.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else out)
        if intermediates_only:
            return intermediates
        # the final norm is sized for the last stage: a map that stopped early comes out as it is
        return (self.norm(x) if len(stages) == len(self.stages) else x), intermediates

    def prune_intermediate_layers(self, indices: Union[None, int, Sequence[int]] = 1,
                                  prune_norm: bool = False, prune_head: bool = True) -> list[int]:
        """Drops the stages after the last one `indices` names (and the norm / head if asked)."""
        take, last = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """A fresh classifier for num_classes (0: none); global_pool "avg" or "" (no pooling)."""
        self.head.reset(num_classes, global_pool)
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        """Recompute each block in the backward (the same outputs and gradients, less memory)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of the parameters to train without weight decay: norms, biases and the
        convolutional position encodings (cpe)."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or ".cpe." in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth for layer-wise learning-rate decay (timm's convention)."""
        return {"stem": r"^stem",
                "blocks": r"^stages\.(\d+)" if coarse else [
                    (r"^stages\.(\d+)\.downsample", (0,)),
                    (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                    (r"^norm", (99999,))]}


def _check_window_size(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                       error_msgs):
    """load_state_dict's pre-hook: weights recorded with another window size are an error
    naming both; a state dict without the record (written before it existed) loads, with a
    warning, as trained with this model's window."""
    key, built = prefix + "window_size", module.config.window_size
    if key not in state_dict:
        warnings.warn(f"this state dict does not record the window size it was trained with; loading it "
                      f"into a model with window_size={built}, which must be the training run's", stacklevel=4)
        state_dict[key] = module.window_size.detach().clone()
    elif int(state_dict[key]) != built:
        error_msgs.append(f"the weights were trained with window_size={int(state_dict[key])}, this model has "
                          f"window_size={built}: build it with window_size={int(state_dict[key])}")


@torch.no_grad()
def _match_gradient_strides(model: nn.Module) -> None:
    """The position encodings' depthwise convolutions see a channels-last view, so their weight
    gradients come with channels-last strides (C*kh*kw, 1, kw, 1): the weights get the same
    strides (equal values, the same memory order), as DDP expects of a gradient (its buckets are
    laid out as the parameters; otherwise it warns and copies at every backward)."""
    for module in model.modules():
        if isinstance(module, RSIRBlock):
            w = module.cpe.weight
            out, inp, kh, kw = w.shape
            strided = torch.empty_strided(w.shape, (kh * kw * inp, 1, kw * inp, inp), dtype=w.dtype, device=w.device)
            w.data = strided.copy_(w)


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build(name: str, **overrides) -> RSIRTransformer:
    """The model named `name` in config.VARIANTS (KeyError for another name). Keyword arguments
    override RSIRConfig fields (e.g. rs_heads=(4, 4, 8, 16): every head RS-Win); `generator`
    seeds RS-Win."""
    generator = overrides.pop("generator", None)
    model = RSIRTransformer(VARIANTS[name].config, generator, **overrides)
    model.pretrained_cfg = model.default_cfg = default_cfg(architecture=name, num_classes=model.num_classes)
    return model


def rsir_tiny(**overrides) -> RSIRTransformer:
    """RSIR-T: 64 channels, depths 2, 2, 16, 2, heads 4, 4, 8, 16 (Table 2), half of them RS-Win.
    Keyword arguments override RSIRConfig fields (e.g. rs_heads=(4, 4, 8, 16): every head
    RS-Win); `generator` seeds RS-Win."""
    return build("rsir_tiny", **overrides)


def rsir_base(**overrides) -> RSIRTransformer:
    """RSIR-B: 96 channels, depths 2, 4, 24, 2, heads 4, 8, 16, 32 (Table 2)."""
    return build("rsir_base", **overrides)


def rsir_micro(**overrides) -> RSIRTransformer:
    """A small variant for tests and demos (not in the paper): 32 channels, depths 1, 1, 2, 1,
    heads 2, 2, 4, 8."""
    return build("rsir_micro", **overrides)


BUILDERS = {name: functools.partial(build, name) for name in MODEL_NAMES}  # name -> build(name, **overrides)
