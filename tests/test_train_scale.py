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

from rsir_kernels import checkpoint_format as checkpoint
from rsir_kernels.train import build, cli, distributed, loop, options, recipe, run
from rsir_kernels.train.data import digits, train_loader
from rsir_kernels.train.model import create_model

from test_train import _one_error_line, _torchrun, single_process  # noqa: F401 (autouse)
from test_train_safety import BASE, SMALL, train


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


def _digits_tree(root, train_per_class=8, val_per_class=2):
    """An ImageFolder tree of scikit-learn's digits as 32x32 RGB PNGs: root/{train,val}/<digit>/*.png."""
    from PIL import Image
    data = digits()
    for split, dataset, per_class in (("train", data.train, train_per_class), ("val", data.val, val_per_class)):
        images, labels = dataset.tensors
        for c in range(10):
            os.makedirs(root / split / str(c), exist_ok=True)
            for i, j in enumerate((labels == c).nonzero()[:per_class, 0].tolist()):
                gray = ((images[j, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(gray).convert("RGB").save(root / split / str(c) / f"{i}.png")
    return root


def test_paper_recipe_trains_an_image_folder_under_torchrun_with_every_element_active(tmp_path):
    _digits_tree(tmp_path / "tree")
    proc = _torchrun("tests/train_worker.py", "paper", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["epochs"] == [1, 2]
    saved = result["args"]
    assert (saved["recipe"], saved["randaugment"], saved["mixup"], saved["cutmix"], saved["reprob"],
            saved["label_smoothing"], saved["drop_path"], saved["clip_grad"], saved["model_ema"]) == (
        "paper", "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.25, 0.1, 0.1, 5.0, None)
    steps, per_rank = 2 * 5, 8  # 80 images, global batch 16: 5 steps per epoch, 8 images per rank
    for calls in result["ranks"]:
        assert calls["randaugment"] == steps * per_rank  # every training image, in the loader
        assert calls["erasing"] == steps * per_rank  # timm's RandomErasing: 0.25, 'pixel', one region
        assert calls["mixup_soft_targets"] == steps  # mixup 0.8 / cutmix 1.0 on every batch
        assert calls["clip"] == [5.0] * steps
        assert calls["drop_path"] > 0  # the blocks' DropPath ran in training with p > 0
        assert max(calls["drop_path_rates"]) == pytest.approx(0.1)


def test_paper_randaugment_survives_the_posterize_magnitude_that_broke_it():
    """rand-m9-mstd0.5-inc1 draws magnitudes around 9; at 10 'PosterizeIncreasing' keeps 0 bits,
    which this Pillow refuses: the recipe's transform gives the black image older Pillow gave."""
    from PIL import Image
    from timm.data.auto_augment import RandAugment, posterize
    from rsir_kernels.train import augment
    cfg = dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    transform = augment.train_transform(cfg, "rand-m9-mstd0.5-inc1", 0.25)
    rand = [t for t in transform.transforms if isinstance(t, RandAugment)]
    op = [o for o in rand[0].ops if o.name == "PosterizeIncreasing"][0]
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0  # the draw that broke
    assert op.level_fn(10, op.hparams) == (0,)
    image = Image.fromarray(torch.randint(1, 256, (32, 32, 3), dtype=torch.uint8).numpy())
    with pytest.raises(ValueError, match="bits"):
        posterize(image, 0)  # timm's own, on this Pillow
    out = op(image)
    assert out.mode == "RGB" and out.size == image.size and not any(out.getpixel((i % 32, i // 32)) != (0, 0, 0)
                                                                   for i in range(32 * 32))
    assert op(image) is not image and augment.posterize(image, 8) is image
    erasing = [t for t in transform.transforms if type(t).__name__ == "RandomErasing"]
    assert (erasing[0].probability, erasing[0].mode, erasing[0].max_count) == (0.25, "pixel", 1)


def test_recipe_paper_is_saved_overridable_and_names_what_it_skips_on_tensor_data(tmp_path, capsys):
    train(tmp_path / "run", *SMALL, "--epochs", "1", "--recipe", "paper", "--mixup", "0.5", "--clip-grad", "0")
    banner = capsys.readouterr().out
    assert "recipe paper: randaugment rand-m9-mstd0.5-inc1, mixup 0.5, cutmix 1, random erasing 0.25" in banner
    assert "skipped on tensor data (needs images): randaugment" in banner
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    args = saved["args"]
    assert (args["mixup"], args["cutmix"], args["reprob"], args["label_smoothing"], args["drop_path"],
            args["clip_grad"], args["recipe_skipped"]) == (0.5, 1.0, 0.25, 0.1, 0.1, None, ["randaugment"])
    assert saved["model_args"]["drop_path_rate"] == 0.1
    from rsir_kernels.train import recipe as r
    assert r.PAPER_DROP_PATH == {"rsir_micro": 0.1, "rsir_tiny": 0.2, "rsir_base": 0.5}


def test_random_erasing_on_tensor_batches_erases_one_region_per_chosen_image():
    from rsir_kernels.train import augment
    torch.manual_seed(0)
    import random
    random.seed(0)
    batch = torch.zeros(64, 1, 32, 32)
    erased = augment.batch_eraser(0.25, "cpu")(batch.clone())
    changed = (erased != 0).flatten(1).any(1)
    assert 5 <= changed.sum().item() <= 30  # about a quarter of 64
    assert augment.batch_eraser(0.0, "cpu") is None


def _manual_ema(weights, decay):
    """timm's ModelEmaV3 with warmup, written out: update t (1-based, timm's train.py passes the
    updates done) uses decay_t = min(decay, 1 - t ** (-2/3)) (0 at t = 1: a copy of the weights),
    ema = decay_t * ema + (1 - decay_t) * w."""
    ema = {k: v.double().clone() for k, v in weights[0].items()}
    for t, w in enumerate(weights[1:], 1):
        d = min(decay, 1 - t ** (-2 / 3))
        for k in ema:
            ema[k] = d * ema[k] + (1 - d) * w[k].double()
    return ema


def test_ema_is_timms_is_evaluated_and_resumes_bitwise_and_best_pt_follows_it(tmp_path):
    run_args = [*SMALL, "--epochs", "3", "--model-ema", "0.9", "--checkpoint-hist", "1"]
    weights = []

    def record(step, loss, model):
        if not weights:
            weights.append(initial)
        weights.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})
    import timm
    from rsir_kernels.train import distributed as d
    d.seed_all(0)
    initial = {k: v for k, v in timm.create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4,
                                                    backend="cpp").state_dict().items() if v.is_floating_point()}
    straight = train(tmp_path / "straight", *run_args, on_step=record)
    train(tmp_path / "resumed", *run_args, "--stop-after", "1")
    train(tmp_path / "resumed", *run_args, "--resume", str(tmp_path / "resumed" / "last.pt"))
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    want = _manual_ema(weights, 0.9)
    assert max((a["model_ema"][k].double() - want[k]).abs().max().item() for k in want) < 1e-6
    assert not torch.equal(a["model_ema"]["head.fc.weight"], a["model"]["head.fc.weight"])
    rows = straight["metrics"]
    assert all(0 <= r["val_top1_ema"] <= 100 for r in rows)
    best = torch.load(tmp_path / "straight" / "best.pt", weights_only=True)
    assert best["metrics"]["val_top1_ema"] == max(r["val_top1_ema"] for r in rows)
    assert best["epoch"] == next(r["epoch"] for r in rows if r["val_top1_ema"] == best["metrics"]["val_top1_ema"])
    assert sorted(f for f in os.listdir(tmp_path / "straight") if f.startswith("checkpoint-")) == ["checkpoint-3.pt"]
    assert (tmp_path / "straight" / "checkpoint-3.pt").read_bytes() == (tmp_path / "straight" / "last.pt").read_bytes()


def test_ema_with_fsdp_and_bad_decays_are_refused_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build, "model_and_data", lambda *a, **k: pytest.fail("built before the arguments were checked"))
    out = ["--output", str(tmp_path / "o"), "--epochs", "1"]
    assert "--model-ema with --fsdp is not supported" in _one_error_line(capsys, BASE + out + ["--model-ema", "0.99",
                                                                                             "--fsdp"])
    assert "--model-ema must be a decay in (0, 1)" in _one_error_line(capsys, BASE + out + ["--model-ema", "1.5"])
    assert "--reprob must be in [0, 1]" in _one_error_line(capsys, BASE + out + ["--reprob", "2"])


def test_data_loading_wait_is_measured_per_epoch(tmp_path, monkeypatch):
    """A loader that takes 50 ms per batch: the epoch's data_s counts those waits."""
    import time
    from rsir_kernels.train import data as datasets
    make = datasets.train_loader

    class Slow:
        def __init__(self, loader):
            self.loader, self.sampler = loader, loader.sampler

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                time.sleep(0.05)
                yield batch
    monkeypatch.setattr(datasets, "train_loader", lambda *a, **k: Slow(make(*a, **k)))
    out = train(tmp_path / "run", *SMALL, "--epochs", "1", "--batch-size", "16")
    row = out["metrics"][0]
    assert 4 * 0.05 <= row["data_s"] <= row["epoch_s"]


def _torchrun_n(nproc, *argv, timeout=400):
    import subprocess
    import sys
    from test_train import ROOT, _free_port
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc_per_node", str(nproc),
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _equal_states(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_by_name(state, names_from):
    """An index-keyed optimizer state dict (optimizer.state_dict()) keyed by the parameter names
    that names_from (a name-keyed one of the same optimizer) lists in the same group order."""
    order = [n for g in names_from["param_groups"] for n in g["params"]]
    index = [i for g in state["param_groups"] for i in g["params"]]
    return {order[index.index(i)]: v for i, v in state["state"].items()}


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def test_fsdp_sharded_checkpoints_resume_at_another_world_size_and_continue_the_run(tmp_path):
    """FSDP2 writes torch.distributed.checkpoint shards beside last.pt. In fp64 with the randomness
    removed (tests/train_worker.py's fp64_without_randomness): a 2-process FSDP run stopped after
    epoch 1 resumes with 1 process, and a 1-process run resumes with 2 under FSDP; right after
    loading, weights and optimizer state equal the saved ones bitwise; the next steps equal a
    straight 1-process run's to 1e-12 (the global batches hold the same images at any world
    size); at the same world size the resumed FSDP run is bitwise the straight FSDP run.
    Gradient accumulation under FSDP2 and DDP (2 ranks x 2 micro-batches) takes the same steps."""
    for nproc, mode in ((1, "reshard-1a"), (2, "reshard-2"), (1, "reshard-1c")):
        if mode == "reshard-1c":  # a save of epoch 2 killed midway: shards written, no .metadata, no last.pt
            os.makedirs(tmp_path / "fsdp_copy" / "sharded" / "step-6")
            (tmp_path / "fsdp_copy" / "sharded" / "step-6" / "__0_0.distcp").write_bytes(b"half a shard")
        proc = _torchrun_n(nproc, "tests/train_worker.py", mode, str(tmp_path))
        assert proc.returncode == 0, (mode, proc.stderr[-3000:])
    result = {}
    for mode in ("reshard-1a", "reshard-2", "reshard-1c"):
        result |= torch.load(tmp_path / f"{mode}.pt", weights_only=True)
    straight = result["straight"]
    assert len(straight) == 6  # 96 items, batch 32, 2 epochs
    for name in ("fsdp_2_to_2", "one_1_to_2", "fsdp_2_to_1"):
        loaded, saved = result[f"loaded_{name}"], result[f"saved_{name}"]
        assert saved["epoch"] == 1 and _equal_states(loaded["model"], saved["model"]), name
        if saved["sharded"]:  # FSDP's: the optimizer lives in the DCP shards only
            assert saved["optimizer"] is None and _equal_states(loaded["model"], result[f"dcp_{name}"]["model"])
            want = result[f"dcp_{name}"]["optimizer"]["state"]
        else:
            want = _optimizer_by_name(saved["optimizer"], loaded["optimizer"])
        got = loaded["optimizer"]["state"]
        assert got.keys() == want.keys() and all(_equal_states(got[k], want[k]) for k in got), name
        steps = result[name]
        assert len(steps) == 3
        if name == "fsdp_2_to_2":
            assert all(_equal_states(a, b) for a, b in zip(steps, result["fsdp_straight"][3:]))
        else:
            assert max(_max_diff(a, b) for a, b in zip(steps, straight[3:])) <= 1e-12, name
    assert max(_max_diff(a, b) for a, b in zip(result["fsdp_straight"], straight)) <= 1e-12
    for name in ("fsdp_accum", "ddp_accum"):  # accumulation under FSDP2 and DDP: the same steps
        assert len(result[name]) == 6 and max(_max_diff(a, b) for a, b in zip(result[name], straight)) <= 1e-12, name
    assert sorted(os.listdir(tmp_path / "fsdp" / "sharded")) == ["step-6"]  # only last.pt's shards are kept
    assert os.listdir(tmp_path / "fsdp_copy" / "sharded") == []  # one process writes last.pt whole: none kept
    # FSDP's last.pt is the trust promises' weights file: checksum, weights_only, from_checkpoint, timm
    import timm
    from rsir_kernels.models import from_checkpoint
    path = str(tmp_path / "fsdp" / "last.pt")
    saved = checkpoint.read(path)
    assert saved["checksum"] == checkpoint.checksum(saved) and _equal_states(saved["model"], result["fsdp_2_to_2"][-1])
    rebuilt = from_checkpoint(path, backend="cpp")
    assert all(torch.equal(v, saved["model"][k].float()) for k, v in rebuilt.state_dict().items())
    plain = timm.create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4, backend="cpp")
    timm.models.load_checkpoint(plain, path)
    assert _equal_states(plain.state_dict(), rebuilt.state_dict())


def test_resume_names_a_missing_sharded_checkpoint_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "1")
    saved = torch.load(out / "last.pt", weights_only=True)
    checkpoint.save(str(out / "last.pt"), {k: v for k, v in saved.items() if k != "checksum"} | {
        "sharded": "sharded/step-2", "optimizer": None})
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "2", "--resume", str(out / "last.pt")])
    assert f"its sharded checkpoint {out / 'sharded' / 'step-2'} is missing or incomplete" in line, line


def test_workers_default_to_the_nodes_cores_shared_out_among_its_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "model_and_data", lambda *a, **k: pytest.fail("not needed"))
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    from rsir_kernels.train.distributed import World
    world = World(0, 1, 0, torch.device("cpu"))
    for ranks, data, want in (("2", "tree", 8), ("8", "tree", 4), ("64", "tree", 1), ("2", "digits", 0)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        args = cli.parser().parse_args(BASE + ["--data", data, "--output", str(tmp_path / "o")])
        options.resolve(args, world)
        assert args.workers == want, (ranks, data)
