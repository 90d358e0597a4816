"""Command-line arguments of python -m rsir_kernels.train (also under torchrun).

The parsed namespace also says which options were given (`args.given`, {name: value as given}):
a resumed run takes its saved values for the options not given again (train/resume.py).
"""
from __future__ import annotations

import argparse

from ..models.config import MODEL_NAMES

_UNSET = object()  # an option's value before parsing: still _UNSET after it, it was not given


class Parser(argparse.ArgumentParser):
    """argparse, recording in args.given the options given on the command line (before any
    default or resolution): argparse sets a default only where the namespace has no value yet."""

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        dests = [a.dest for a in self._actions if a.dest != argparse.SUPPRESS and a.default != argparse.SUPPRESS]
        for dest in dests:
            if not hasattr(namespace, dest):
                setattr(namespace, dest, _UNSET)
        namespace, rest = super().parse_known_args(args, namespace)
        defaults = {a.dest: a.default for a in self._actions}
        given = {}
        for dest in dests:
            value = getattr(namespace, dest)
            if value is _UNSET:
                setattr(namespace, dest, defaults[dest])
            else:
                given[dest] = value
        namespace.given = given
        return namespace, rest


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m rsir_kernels.train",
        description="Train an RSIR model: one process, or one per device under "
                    "torchrun --nproc_per_node N -m rsir_kernels.train ...")
    data = p.add_argument_group("data")
    data.add_argument("--data", default="digits",
                      help="'digits' (scikit-learn's, bundled), 'fake' (random images of the model's input "
                           "size) or PATH of an ImageFolder tree PATH/train/<class>/*, PATH/val/<class>/*")
    data.add_argument("--workers", type=int, default=None,
                      help="data loader processes per rank (ImageFolder; default: this node's cores shared out "
                           "among its ranks, at most 8)")
    data.add_argument("--train-items", type=int, default=None, help="train on the first N items only")
    data.add_argument("--val-items", type=int, default=None, help="evaluate on the first N items only")
    data.add_argument("--img-size", type=int, default=None, help="input side for ImageFolder/fake data "
                      "(default: the model's pretrained_cfg, 224); any size, no multiple of 32 needed")
    model = p.add_argument_group("model")
    model.add_argument("--model", default="rsir_micro", help=f"one of {', '.join(MODEL_NAMES)}")
    model.add_argument("--drop-path", type=float, default=None,
                       help="stochastic depth rate (default 0; --recipe paper: per model, see docs/training.md)")
    model.add_argument("--backend", default="auto", help="window_attention backend: auto, cpp, triton, reference")
    model.add_argument("--window-size", type=int, default=None,
                       help="window side (default: 4 on digits' 32x32 images, the model's 7 otherwise)")
    model.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                       help="model.set_grad_checkpointing()")
    model.add_argument("--recompute-qkv", action=argparse.BooleanOptionalAction, default=False,
                       help="recompute each attention's qkv projection and attention in the backward")
    recipe = p.add_argument_group("recipe (the paper's optimizer and schedule, section 4.1, by default)")
    recipe.add_argument("--recipe", choices=("paper",), default=None,
                        help="'paper': also the paper's (Swin's) augmentation and regularization: RandAugment "
                             "rand-m9-mstd0.5-inc1, mixup 0.8, cutmix 1.0, random erasing 0.25, label smoothing 0.1, "
                             "drop path per model, --clip-grad 5; each option given explicitly overrides it")
    recipe.add_argument("--epochs", type=int, default=300)
    recipe.add_argument("--batch-size", type=int, default=256, help="global batch per optimizer step, over all ranks "
                        "and accumulated micro-batches")
    recipe.add_argument("--grad-accum-steps", type=int, default=1, metavar="K",
                        help="K micro-batches of batch/(ranks*K) images per optimizer step (their gradients summed)")
    recipe.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 * batch / 256)")
    recipe.add_argument("--weight-decay", type=float, default=0.05)
    recipe.add_argument("--warmup-epochs", type=float, default=None,
                        help="linear warmup (default: the paper's 20 of 300 epochs, as a share of --epochs)")
    recipe.add_argument("--label-smoothing", type=float, default=None, help="default 0.1")
    recipe.add_argument("--clip-grad", type=float, default=None, help="clip the gradient norm to this (0: off)")
    recipe.add_argument("--mixup", type=float, default=None, help="mixup alpha (timm), 0: off (the default)")
    recipe.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (timm), 0: off (the default)")
    recipe.add_argument("--randaugment", default=None, metavar="SPEC",
                        help="timm auto_augment spec for ImageFolder training, e.g. rand-m9-mstd0.5-inc1 ('none': off)")
    recipe.add_argument("--reprob", type=float, default=None,
                        help="random erasing probability (timm's, 'pixel' mode, one region), 0: off (the default)")
    recipe.add_argument("--model-ema", type=float, default=None, metavar="DECAY",
                        help="keep timm's ModelEmaV3 of the weights (with its decay warmup), evaluated each epoch")
    recipe.add_argument("--seed", type=int, default=0)
    speed = p.add_argument_group("precision and speed")
    speed.add_argument("--amp", choices=("fp32", "bf16", "fp16"), default="fp32",
                       help="autocast dtype (fp16 adds a gradient scaler)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                       help="torch.compile the model")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                       help="images and convolutions in NHWC")
    speed.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=False, help="FSDP2 (fully_shard per block, then the model) "
                       "instead of DDP")
    speed.add_argument("--threads", type=int, default=None,
                       help="CPU threads per rank (default: the cores shared out among this node's ranks)")
    speed.add_argument("--steps-per-epoch", type=int, default=None, help="stop each epoch after N steps")
    speed.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is present, else cpu")
    out = p.add_argument_group("output")
    out.add_argument("--output", default=None, help="folder for last.pt, metrics.jsonl, curves.png "
                     "(default: a fresh runs/<time>-<model>-<data>, or --resume's folder)")
    out.add_argument("--resume", default=None, metavar="OUTPUT/last.pt|auto",
                     help="continue this run, its options as saved unless given again (--epochs, --lr and the "
                          "other recipe options may change and take effect from its step on; data, model, batch "
                          "and seed may not). 'auto': continue --output's run if it has one, else start it (one "
                          "command for the first start and every restart)")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh in an --output folder that holds a run, deleting it")
    out.add_argument("--stop-after", type=int, default=None, metavar="EPOCHS",
                     help="end this invocation after that many epochs in all (the schedule still spans "
                          "--epochs), as a time-limited job would; continue with --resume")
    out.add_argument("--save-every-steps", type=int, default=None, metavar="N",
                     help="also save last.pt every N optimizer steps, mid-epoch (a resume continues from that step)")
    out.add_argument("--save-every-minutes", type=float, default=None, metavar="M",
                     help="also save last.pt mid-epoch once M minutes have passed since the last save")
    out.add_argument("--checkpoint-hist", type=int, default=0, metavar="N",
                     help="also keep the last N epochs' checkpoints as checkpoint-EPOCH.pt (best.pt is always kept)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p
