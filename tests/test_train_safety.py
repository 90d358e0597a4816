"""python -m rsir_kernels.train as a long run needs it: no hang on uneven shards, divergence
stops the run, resume applies the new options, checkpoints rebuild their model and detect
damage, no run erased by accident, one-line errors before anything is built.

Small runs (digits, rsir_micro, a few steps); tests/train_worker.py runs the torchrun part.
"""
import json
import math
import os
import shutil
import sys
import warnings

import pytest
import torch

from rsir_kernels import checkpoint_format as checkpoint
from rsir_kernels.train import build, cli, main, options, report, run
from rsir_kernels.train.data import digits

from test_train import _image_tree, _one_error_line, _torchrun, single_process  # noqa: F401 (autouse)

BASE = ["--data", "digits", "--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1"]
SMALL = ["--batch-size", "32", "--train-items", "64", "--val-items", "32"]


def train(output, *extra, on_step=None):
    return run.train(cli.parser().parse_args(BASE + ["--output", str(output), *extra]), on_step=on_step)


def _strict_json_rows(path):
    def refuse(token):
        raise ValueError(f"non-JSON token {token}")
    with open(path) as f:
        return [json.loads(line, parse_constant=refuse) for line in f]


def test_evaluation_ends_on_uneven_shards_under_fsdp_and_ddp_and_divergence_stops_every_rank(tmp_path):
    proc = _torchrun("tests/train_worker.py", "uneven", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Grad strides do not match" not in proc.stderr  # DDP's layout warning, at its cause
    result = json.loads((tmp_path / "result.json").read_text())
    for mode in ("fsdp", "ddp"):  # every item counted once, and the row is what the weights give
        assert result[mode]["items"] == 33
        assert result[mode]["val_top1"] == pytest.approx(result[mode]["recounted_top1"], abs=1e-9)
    for rank in (0, 1):  # rank 1 alone saw NaN; both stopped at the same step
        assert "diverged at epoch 1, step 2: non-finite loss on rank 1 " in result[f"diverged_{rank}"], result


def test_divergence_exits_nonzero_with_one_line_and_keeps_the_last_finite_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "1")
    before = (out / "last.pt").read_bytes()
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "3", "--lr", "1e6", "--resume", str(out / "last.pt")])
    assert "diverged at epoch 2" in line and "non-finite loss" in line, line
    assert (out / "last.pt").read_bytes() == before
    assert [r["epoch"] for r in _strict_json_rows(out / "metrics.jsonl")] == [1]
    fresh = tmp_path / "fresh"  # a new run: it ends within its first epoch and writes no checkpoint
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "3", "--lr", "1e6", "--output", str(fresh)])
    assert "diverged at epoch 1" in line, line
    assert not (fresh / "last.pt").exists()


def test_a_non_finite_gradient_norm_with_clipping_stops_the_run_before_the_step(tmp_path):
    """A finite loss whose gradient is NaN (a hook poisons one parameter's from step 2 on):
    with --clip-grad, Diverged names the gradient norm, and the weights are those of step 1."""
    seen = {}

    def poison(step, loss, model):
        if step == 1:
            seen["model"], seen["weights"] = model, {k: v.clone() for k, v in model.state_dict().items()}
            next(iter(model.parameters())).register_hook(lambda g: g * float("nan"))
    with pytest.raises(run.loop.Diverged, match="epoch 1, step 2: non-finite gradient norm"):
        train(tmp_path / "run", *SMALL, "--epochs", "1", "--clip-grad", "1.0", on_step=poison)
    after = seen["model"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in seen["weights"].items())


def test_fp16_steps_skipped_by_the_grad_scaler_are_not_divergence(tmp_path, monkeypatch):
    """A scale of 2**100 makes the first steps' scaled gradients infinite: the scaler skips them
    and halves its scale; the run goes on."""
    import timm.utils

    class HugeScale(timm.utils.NativeScaler):
        def __init__(self, device="cuda"):
            self._scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 100)
    monkeypatch.setattr(timm.utils, "NativeScaler", HugeScale)
    out = train(tmp_path / "run", *SMALL, "--epochs", "1", "--amp", "fp16")
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert saved["scaler"]["scale"] < 2.0 ** 100  # steps were skipped
    assert math.isfinite(out["metrics"][0]["train_loss"])


def test_metrics_file_is_strict_json_with_null_for_non_finite_numbers(tmp_path):
    report.append_metrics(str(tmp_path), {"epoch": 1, "val_loss": float("inf"), "val_top1": float("nan"), "lr": 0.1})
    assert _strict_json_rows(tmp_path / report.METRICS) == [{"epoch": 1, "val_loss": None, "val_top1": None, "lr": 0.1}]


def test_resume_applies_a_new_epochs_lr_and_weight_decay_and_refuses_a_new_batch(tmp_path, capsys):
    """2 epochs planned, 1 run; resumed with --epochs 4 --lr 0.002 --weight-decay 0.01: epoch 2's
    lr is the closed-form schedule of a 4-epoch run at lr 0.002, the optimizer decays with 0.01,
    and the saved args say so. A new --batch-size is refused naming it."""
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "2", "--stop-after", "1")
    resumed = train(out, *SMALL, "--epochs", "4", "--lr", "0.002", "--weight-decay", "0.01", "--stop-after", "2",
                    "--resume", str(out / "last.pt"))
    lr, steps_per_epoch = 0.002, 2
    total, warmup = 4 * steps_per_epoch, round(4 * 20 / 300 * steps_per_epoch)
    t = 2 * steps_per_epoch - 1  # the last step of epoch 2
    assert t >= warmup
    want = lr / 100 + 0.5 * (lr - lr / 100) * (1 + math.cos(math.pi * t / total))
    assert resumed["metrics"][-1]["lr"] == pytest.approx(want, rel=1e-12)
    saved = torch.load(out / "last.pt", weights_only=True)
    assert sorted({g["weight_decay"] for g in saved["optimizer"]["param_groups"]}) == [0.0, 0.01]
    assert (saved["args"]["epochs"], saved["args"]["lr"], saved["args"]["weight_decay"]) == (4, 0.002, 0.01)
    line = _one_error_line(capsys, BASE + ["--batch-size", "16", "--train-items", "64", "--val-items", "32",
                                           "--epochs", "4", "--resume", str(out / "last.pt")])
    assert "--batch-size (32, now 16)" in line, line


def test_checkpoint_rebuilds_its_model_and_refuses_another_window(tmp_path):
    import timm
    from rsir_kernels.models import from_checkpoint
    out = train(tmp_path / "run", *SMALL, "--epochs", "1")
    path = str(tmp_path / "run" / "last.pt")
    saved = torch.load(path, weights_only=True)  # plain types only
    assert saved["model_name"] == "rsir_micro" and saved["args"]["window_size"] == 4
    assert saved["model_args"]["window_size"] == 4 and saved["model_args"]["in_chans"] == 1
    assert saved["metrics"] == out["metrics"][-1]
    images = digits().val.tensors[0][:8]
    trained = out["model"].eval()
    rebuilt = from_checkpoint(path, backend="cpp")
    assert not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(images), trained(images))
    same = timm.create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4, backend="cpp")
    timm.models.load_checkpoint(same, path)
    named = timm.create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4, backend="cpp",
                              checkpoint_path=path).eval()
    with torch.no_grad():
        assert torch.equal(same.eval()(images), rebuilt(images)) and torch.equal(named(images), rebuilt(images))
    seven = timm.create_model("rsir_micro", num_classes=10, in_chans=1)  # the default window, 7
    with pytest.raises(RuntimeError, match="window_size=4.*window_size=7"):
        timm.models.load_checkpoint(seven, path)
    old = {k: v for k, v in saved["model"].items() if k != "window_size"}  # a file from before the record
    with pytest.warns(UserWarning, match="does not record the window size"):
        seven.load_state_dict(old)


def test_image_folder_checkpoint_keeps_its_class_names(tmp_path):
    root = _image_tree(tmp_path / "tree")
    train(tmp_path / "run", "--data", str(root), "--img-size", "32", "--workers", "0", "--batch-size", "4",
          "--epochs", "1")
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["class_names"] == ["a", "b"]


def _flip_a_bit_in(path, tensor):
    data = bytearray(path.read_bytes())
    at = data.find(tensor.numpy().tobytes())
    assert at > 0
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_refused_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "1")
    saved = torch.load(out / "last.pt", weights_only=True)
    _flip_a_bit_in(out / "last.pt", saved["model"]["head.fc.weight"])
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "2", "--resume", str(out / "last.pt")])
    assert str(out / "last.pt") in line and "damaged" in line, line
    from rsir_kernels.models import from_checkpoint
    with pytest.raises(ValueError, match="damaged"):
        from_checkpoint(str(out / "last.pt"))


def test_output_holding_a_run_is_refused_untouched_without_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "2")
    files = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "1", "--output", str(out)])
    assert "--resume" in line and "--overwrite" in line, line
    assert {name: (out / name).read_bytes() for name in files} == files
    train(out, *SMALL, "--epochs", "1", "--overwrite")
    assert [r["epoch"] for r in report.read_metrics(str(out))] == [1]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_resume_restores_a_lost_metrics_row_and_repairs_a_torn_line(tmp_path, capsys):
    """A kill after last.pt's rename and before the metrics append loses epoch 2's row: the
    checkpoint's copy puts it back. A torn last line (no newline) is dropped; a damaged line
    before the last is named."""
    out = tmp_path / "run"
    train(out, *SMALL, "--epochs", "3", "--stop-after", "2")
    path = out / "metrics.jsonl"
    rows = path.read_text().splitlines(keepends=True)
    path.write_text(rows[0] + '{"epoch": 2, "train_lo')  # row 2 lost, a torn line in its place
    resumed = train(out, *SMALL, "--epochs", "3", "--resume", str(out / "last.pt"))
    assert [r["epoch"] for r in _strict_json_rows(path)] == [1, 2, 3]
    assert _strict_json_rows(path)[:2] == [json.loads(r) for r in rows]
    assert resumed["metrics"] == _strict_json_rows(path)
    path.write_text("{not json\n" + "".join(rows))
    line = _one_error_line(capsys, BASE + SMALL + ["--epochs", "3", "--resume", str(out / "last.pt")])
    assert f"{path}: line 1 is not JSON" in line, line


BAD_ARGUMENTS = [
    (["--img-size", "0"], "--img-size must be >= 1"),
    (["--backend", "foo"], "--backend 'foo'"),
    (["--window-size", "0"], "--window-size must be >= 1"),
    (["--threads", "-1"], "--threads must be >= 1"),
    (["--stop-after", "0"], "--stop-after must be >= 1"),
    (["--mixup", "0.8", "--batch-size", "33"], "must be even, got 33"),
    (["--drop-path", "1.5"], "--drop-path must be in"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--overwrite", "--resume", "x.pt"], "give one of them"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_exit_with_one_line_before_data_or_model_are_built(tmp_path, capsys, monkeypatch, extra,
                                                                        message):
    def must_not_build(*args, **kwargs):
        raise AssertionError("built before the arguments were checked")
    monkeypatch.setattr(build, "model_and_data", must_not_build)
    line = _one_error_line(capsys, BASE + ["--epochs", "1", "--output", str(tmp_path / "out"), *extra])
    assert message in line, line
    assert not (tmp_path / "out").exists()


def test_output_naming_a_file_and_triton_on_cpu_and_no_timm_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(build, "model_and_data", lambda *a, **k: pytest.fail("built before the arguments were checked"))
    file = tmp_path / "file"
    file.write_text("x")
    assert "a file, not a folder" in _one_error_line(capsys, BASE + ["--output", str(file)])
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter mode, off
    with pytest.raises(run.TrainError, match="--backend triton"):
        options.check_backend("triton", torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    assert "needs timm" in _one_error_line(capsys, BASE + ["--output", str(tmp_path / "o")])


def test_training_sets_no_process_wide_warning_filter(tmp_path):
    # a first run imports what training imports; libraries such as scipy add filters of their
    # own at import time (whether here depends on what this worker ran before): undone on exit
    with warnings.catch_warnings():
        train(tmp_path / "warm", *SMALL, "--epochs", "1")
    filters = list(warnings.filters)
    train(tmp_path / "run", *SMALL, "--epochs", "1")
    assert warnings.filters == filters


def test_files_from_other_tools_are_refused_saying_what_they_are(tmp_path):
    """What a user may pass as a checkpoint by mistake, each written by its own tool: a text
    file is no torch.save file; torch.save of a module (new and legacy serialization) holds
    objects weights_only refuses; a copy of a real file cut short is unreadable. Each is one
    CheckpointError naming the file, from the models' loader as well. A .safetensors file
    (timm's weights format) torch.load reads: its tensors come back, and from_checkpoint says
    it is no training checkpoint."""
    from safetensors.torch import save_file
    from rsir_kernels.models import from_checkpoint
    weights = {"head.fc.weight": torch.randn(3, 4)}
    (tmp_path / "notes.txt").write_text("not weights\n")
    torch.save(torch.nn.Linear(4, 3), tmp_path / "module.pt")
    torch.save(torch.nn.Linear(4, 3), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    torch.save(weights, tmp_path / "whole.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "whole.pt").read_bytes()[:200])
    save_file(weights, str(tmp_path / "model.safetensors"))
    expected = {"notes.txt": "not a file torch.save writes", "module.pt": "holds objects other than tensors",
                "legacy.pt": "holds objects other than tensors", "cut.pt": "not a readable checkpoint"}
    for name, message in expected.items():
        with pytest.raises(checkpoint.CheckpointError, match=message) as caught:
            checkpoint.read(str(tmp_path / name))
        assert str(tmp_path / name) in str(caught.value)
        with pytest.raises(ValueError, match=message):
            from_checkpoint(str(tmp_path / name))
    for name in ("whole.pt", "model.safetensors"):
        assert torch.equal(checkpoint.read(str(tmp_path / name))["head.fc.weight"], weights["head.fc.weight"])
    with pytest.raises(ValueError, match="not a training checkpoint"):
        from_checkpoint(str(tmp_path / "model.safetensors"))
