"""What a run trains with, built from its resolved arguments: the model (the resumed weights in
it), the data and its loaders, the wrapped model, the optimizer and the rest of the recipe."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import augment, data as datasets, distributed, recipe, resume
from .errors import TrainError
from .model import create_model, pretrained_cfg


@dataclasses.dataclass
class Training:
    model: nn.Module                # the module whose state is saved (FSDP2: sharded in place)
    forward: nn.Module              # what trains: DDP's wrapper or the FSDP2 module, compiled with --compile
    eval_model: nn.Module           # what evaluates (FSDP2: forward, a collective on every rank)
    ema: Optional[Any]              # timm's ModelEmaV3, or None
    data: datasets.Data
    fingerprint: dict               # data.fingerprint, saved and compared on --resume
    moved: Optional[str]            # resume.check_data's note when the data moved, else None
    train_loader: Any
    val_loader: Any
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any                  # timm's CosineLRScheduler, a function of the step
    scaler: Optional[Any]           # timm's NativeScaler under --amp fp16
    mixup: Optional[Callable]
    loss_fn: nn.Module
    erase: Optional[Callable]       # random erasing on the batch (tensor data)


def training(args, world, resumed: Optional[dict]) -> Training:
    """Everything the epochs need, on this rank. The optimizer's state, the scaler's and the
    position are not restored here (state.restore); the model's weights are when not under
    --fsdp: before DDP, which broadcasts rank 0's, and before the EMA copies them."""
    model, data, fingerprint = model_and_data(args, world)
    moved = resume.check_data(args, resumed, fingerprint) if resumed is not None else None
    if resumed is not None and not args.fsdp:
        # load_state_dict, not set_model_state_dict: see state_dicts.load_full_model
        model.load_state_dict(resumed["model"])
    ema = None
    if args.model_ema is not None:  # timm's train.py: a copy of the unwrapped model, timm's decay warmup
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=args.model_ema, use_warmup=True)
        if resumed is not None and resumed.get("model_ema") is not None:
            ema.module.load_state_dict(resumed["model_ema"])
    wrapped = distributed.wrap(model, world, args.fsdp)
    micro_batch = args.batch_size // world.world_size // args.grad_accum_steps  # per rank, per backward
    train_loader = datasets.train_loader(data.train, micro_batch, world.rank, world.world_size, args.seed,
                                         _workers(args), seeded_items=args.data not in ("digits", "fake"))
    val_loader = datasets.eval_loader(data.val, micro_batch, world.rank, world.world_size, _workers(args))
    steps = len(train_loader) // args.grad_accum_steps
    steps_per_epoch = min(steps, args.steps_per_epoch or steps)
    if steps_per_epoch == 0:
        raise TrainError(f"the training set has {len(data.train)} items, fewer than one global batch "
                         f"(--batch-size {args.batch_size})")
    optimizer = recipe.optimizer(model, args.lr, args.weight_decay)
    # The schedule is a function of the step and these arguments (none of it is loaded): a
    # resumed run with a new --epochs, --lr or --warmup-epochs follows the new schedule.
    scheduler = recipe.scheduler(optimizer, args.lr, args.epochs * steps_per_epoch,
                                 round(args.warmup_epochs * steps_per_epoch))
    from timm.utils import NativeScaler
    scaler = NativeScaler(world.device.type) if args.amp == "fp16" else None
    mixup = recipe.mixup(args.mixup, args.cutmix, args.label_smoothing, data.num_classes)
    loss_fn = recipe.train_loss(args.label_smoothing, soft_targets=mixup is not None)
    # ImageFolder erases in its transform (per image, in the loader); tensor data on the batch
    erase = augment.batch_eraser(args.reprob, world.device) if args.data in ("digits", "fake") else None
    forward = torch.compile(wrapped) if args.compile else wrapped
    eval_model = forward if args.fsdp else (torch.compile(model) if args.compile else model)
    return Training(model, forward, eval_model, ema, data, fingerprint, moved, train_loader, val_loader,
                    steps_per_epoch, optimizer, scheduler, scaler, mixup, loss_fn, erase)


def model_and_data(args, world) -> tuple:
    """(model on its device, Data, the data's fingerprint), the model initialised from args.seed
    (equal on every rank)."""
    distributed.seed_all(args.seed)
    common = dict(drop_path_rate=args.drop_path, backend=args.backend, recompute_qkv=args.recompute_qkv)
    if args.data == "digits":
        data = datasets.digits()
        model = create_model(args.model, num_classes=data.num_classes, in_chans=1, window_size=args.window_size,
                             **common)
    else:
        if args.data == "fake":
            num_classes = 1000
        else:
            num_classes = len(datasets.image_folder_classes(args.data))
        model = create_model(args.model, num_classes=num_classes, in_chans=3, window_size=args.window_size,
                             **common)
        cfg = pretrained_cfg(model)
        if args.img_size is not None:
            cfg["input_size"] = (3, args.img_size, args.img_size)
        data = (datasets.fake(cfg["input_size"], num_classes) if args.data == "fake"
                else datasets.image_folder(args.data, cfg, auto_augment=args.randaugment, reprob=args.reprob))
    fingerprint = datasets.fingerprint(data, args.data)
    data.train = datasets.subset(data.train, args.train_items)
    data.val = datasets.subset(data.val, args.val_items)
    if len(data.val) < world.world_size:
        raise TrainError(f"the validation set has {len(data.val)} items, fewer than the {world.world_size} ranks")
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise TrainError(f"--grad-checkpointing: {args.model} has no set_grad_checkpointing()")
        model.set_grad_checkpointing(True)
    model = model.to(world.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, data, fingerprint


def _workers(args) -> int:
    return 0 if args.data in ("digits", "fake") else args.workers  # in-memory tensors need no workers
