"""python -m rsir_kernels.train at scale and with the paper's recipe: gradient accumulation,
--recipe paper (RandAugment on the pinned Pillow, random erasing, mixup/cutmix, drop path,
clipping), EMA, best.pt, data-loading time.

Small runs (digits, rsir_micro); tests/train_worker.py runs the torchrun part.
"""
import json
import os

import pytest
import torch
from torch import nn

from rsir_kernels.train import cli, distributed, loop, recipe, run
from rsir_kernels.train.data import digits, train_loader
from rsir_kernels.train.model import create_model

from test_train import _one_error_line

BASE = ["--data", "digits", "--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1"]
SMALL = ["--batch-size", "32", "--train-items", "64", "--val-items", "32"]


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def train(output, *extra, on_step=None):
    return run.train(cli.parser().parse_args(BASE + ["--output", str(output), *extra]), on_step=on_step)


class FixedOrders(nn.Module):
    """The model kept in eval mode while loop.train_epoch trains it: RS-Win takes each layer's
    fixed order (rs_eval="fixed") and drop path is off, so a batch's gradient does not depend on
    how it is split into micro-batches."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x):
        return self.model(x)


def deterministic_fp64_model():
    """rsir_micro in fp64 with random norm weights and biases: IR-Win sorts tokens by their
    channel mean, which right after a LayerNorm at weight 1, bias 0 is rounding noise (its order
    would then depend on the batch); random affine parameters make the means distinct."""
    distributed.seed_all(0)
    model = create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4, backend="cpp").double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.5)
    return FixedOrders(model)


def _accumulated_steps(micro_batch, accum, steps=2):
    """`steps` optimizer steps of batch micro_batch * accum (the same 16 digits per step in
    either split); returns (the gradient of each step, the final weights)."""
    torch.set_num_threads(1)
    model = deterministic_fp64_model()
    images, labels = digits().train.tensors
    data = torch.utils.data.TensorDataset(images[:32].double(), labels[:32])
    loader = train_loader(data, micro_batch, 0, 1, seed=0, workers=0)
    optimizer = recipe.optimizer(model.model, 1e-3)
    scheduler = recipe.scheduler(optimizer, 1e-3, 10, 2)
    grads = []

    def record(step, loss, m):
        grads.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).clone())
    world = distributed.World(0, 1, 0, torch.device("cpu"))
    loop.train_epoch(model, loader, optimizer, scheduler, nn.CrossEntropyLoss(label_smoothing=0.1), world=world,
                     epoch=0, epochs=1, step=0, clip_grad=5.0, show_progress=False, accum=accum, on_step=record,
                     max_steps=steps)
    return grads, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_accumulated_micro_batches_step_as_the_whole_batch_in_fp64():
    """Randomness removed (fixed RS-Win orders, no drop path, no mixup) and fp64: 4 micro-batches
    of 4 give the gradient of one batch of 16, and the same weights after 2 AdamW steps, to 1e-12."""
    whole_grads, whole = _accumulated_steps(16, 1)
    accum_grads, accumulated = _accumulated_steps(4, 4)
    assert len(whole_grads) == len(accum_grads) == 2
    for a, b in zip(accum_grads, whole_grads):
        assert (a - b).abs().max().item() <= 1e-12 * b.abs().max().item()
    assert (accumulated - whole).abs().max().item() <= 1e-12


def test_grad_accum_steps_counts_optimizer_steps_and_must_divide_the_rank_batch(tmp_path, capsys):
    steps = []
    out = train(tmp_path / "run", *SMALL, "--epochs", "1", "--grad-accum-steps", "4",
                on_step=lambda step, loss, model: steps.append(step))
    assert steps == [1, 2]  # 64 items, global batch 32: 2 optimizer steps of 4 micro-batches of 8
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 2
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "1", "--grad-accum-steps", "3", "--output", str(tmp_path / "x")])
    assert "--grad-accum-steps 3 must divide each rank's batch, 32" in line, line
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "1", "--grad-accum-steps", "32", "--mixup", "0.8",
                                                   "--output", str(tmp_path / "y")])
    assert "micro-batch: it must be even, got 1" in line, line
