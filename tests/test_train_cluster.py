"""python -m rsir_kernels.train against what a cluster does to a run: preemption signals (to the
trainer or to torchrun), restarts (torchrun --max-restarts, or the same command run again after
kill -9), `--resume auto`, mid-epoch checkpoints, two nodes, a moved dataset, a resume that
leaves options out, a read-only output and a disk that runs full.

Each interrupted run is compared with the same run uninterrupted: final weights bit for bit and
every metrics row (timings aside). tests/train_cluster_worker.py makes the event happen at a
chosen step; small runs of rsir_micro on digits, one thread per rank.
"""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from rsir_kernels import checkpoint_format as checkpoint
from rsir_kernels.train import build, cli, main, report, run
from rsir_kernels.train.errors import EXIT_PREEMPTED, EXIT_WRITE

from test_train import ROOT, PYTHON_BIN, _free_port, _image_tree, single_process  # noqa: F401 (autouse)

BASE = ["--data", "digits", "--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1"]
# 10 optimizer steps per epoch (320 items, global batch 32), 3 epochs
RUN = ["--batch-size", "32", "--train-items", "320", "--val-items", "64", "--epochs", "3"]
TIMINGS = ("images_per_s", "data_s", "epoch_s")
WORKER = os.path.join(ROOT, "tests", "train_cluster_worker.py")


def _env(event=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RSIR_TEST_EVENT"):
        env.pop(name, None)
    if event:
        env["RSIR_TEST_EVENT"] = event
    return env


def trainer(output, *extra, event=None, timeout=300):
    """python tests/train_cluster_worker.py (the trainer's main) in one process."""
    return subprocess.run([sys.executable, WORKER, *BASE, *RUN, "--output", str(output), *extra], cwd=ROOT,
                          env=_env(event), capture_output=True, text=True, timeout=timeout)


def torchrun(output, *extra, event=None, launcher=(), timeout=300):
    """The trainer under torchrun, 2 processes on this host unless `launcher` says otherwise.
    Gloo's process group on CPU now and then fails to connect its ranks at start (torch's: a
    script of plain init_process_group calls shows it too); such a start, before any step, is
    tried again, up to twice."""
    for _ in range(3):
        ports = ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
        proc = subprocess.run([os.path.join(PYTHON_BIN, "torchrun"), *(launcher or ["--nproc_per_node", "2", *ports]),
                               WORKER, *BASE, *RUN, "--output", str(output), *extra], cwd=ROOT, env=_env(event),
                              capture_output=True, text=True, timeout=timeout)
        if "connectFullMesh failed" not in proc.stderr:
            return proc
    return proc


def finished(output):
    """(final weights, metrics rows without timings) of the run in output."""
    saved = checkpoint.read(os.path.join(output, "last.pt"))
    rows = [{k: v for k, v in r.items() if k not in TIMINGS} for r in report.read_metrics(str(output))]
    return saved["model"], rows


def assert_same_run(a, b):
    (weights_a, rows_a), (weights_b, rows_b) = finished(a), finished(b)
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    for name in weights_a:
        assert torch.equal(weights_a[name], weights_b[name]), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted runs: one process and two (torchrun)."""
    folder = tmp_path_factory.mktemp("straight")
    one = trainer(folder / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(folder / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    return {"one": folder / "one", "two": folder / "two"}


@pytest.mark.parametrize("sig", ["sigterm", "sigusr1"])
def test_a_stop_signal_mid_epoch_saves_that_step_exits_75_and_resumes_bit_for_bit(tmp_path, straight, sig):
    """The signal comes after step 14 (epoch 2, step 4 of 10); the ranks agree on it with the
    next step's loss check, so step 15 is the one finished and saved."""
    out = tmp_path / "run"
    stopped = trainer(out, event=f"{sig}-self:14")
    assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith(f"preempted: {sig.upper()} at epoch 2, step 5/10") and "--resume auto" in line, line
    saved = checkpoint.read(str(out / "last.pt"))
    assert (saved["epoch"], saved["step"], saved["position"]["epoch_step"]) == (1, 15, 5)
    assert not os.path.exists(out / "last.pt.tmp")
    resumed = trainer(out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight["one"])


def test_sigterm_or_sigusr1_to_torchrun_stops_every_rank_after_its_step_and_resumes_bit_for_bit(tmp_path, straight):
    """torchrun forwards SIGTERM to its workers; SIGUSR1 (SLURM's early warning) when it is asked
    to handle it (--signals-to-handle, as docs/training.md shows)."""
    out = tmp_path / "run"
    stopped = torchrun(out, event="sigterm-parent:7")
    assert "preempted: SIGTERM at epoch 1" in stopped.stderr, stopped.stderr[-3000:]
    assert checkpoint.read(str(out / "last.pt"))["position"]["epoch_step"] >= 7
    stopped = torchrun(out, "--resume", "auto", event="sigusr1-parent:22",
                       launcher=["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                                 str(_free_port()), "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"])
    assert "preempted: SIGUSR1 at epoch 3" in stopped.stderr, stopped.stderr[-3000:]
    resumed = torchrun(out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(out, straight["two"])


def test_same_command_after_kill_9_of_every_process_continues_from_the_last_step_checkpoint(tmp_path, straight):
    out = tmp_path / "run"
    command = ("--resume", "auto", "--save-every-steps", "4")
    killed = trainer(out, *command, event="kill-once:19")
    assert killed.returncode == -signal.SIGKILL
    saved = checkpoint.read(str(out / "last.pt"))
    assert (saved["step"], saved["position"]["epoch_step"]) == (16, 6)  # the save of step 16, mid-epoch 2
    again = trainer(out, *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed" in again.stdout and "step 6/10" in again.stdout
    assert_same_run(out, straight["one"])


@pytest.mark.skipif(os.environ.get("RSIR_GLOO_RESTARTS") != "1", reason=(
    "gloo's process group on CPU sometimes hangs when torchrun restarts its workers (torch's: a script of "
    "plain init_process_group calls shows it): RSIR_GLOO_RESTARTS=1 runs it; the same resume path runs in "
    "test_same_command_after_kill_9_of_every_process_continues_from_the_last_step_checkpoint"))
def test_torchrun_max_restarts_continues_a_run_whose_worker_was_killed_mid_epoch(tmp_path, straight):
    out = tmp_path / "run"
    restarted = torchrun(out, "--resume", "auto", "--save-every-steps", "4", event="kill-once:17:1",
                         launcher=["--nproc_per_node", "2", "--max-restarts", "1", "--rdzv-backend", "c10d",
                                   "--rdzv-endpoint", f"127.0.0.1:{_free_port()}"], timeout=200)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert_same_run(out, straight["two"])


def test_save_every_minutes_saves_mid_epoch_on_rank_0s_clock(tmp_path):
    seen = []

    def look(step, loss, model):  # the save of a step comes after this hook: the previous step's is there
        if step > 1:
            seen.append(checkpoint.read(str(tmp_path / "run" / "last.pt"))["position"])
    _in_process(tmp_path, "--epochs", "1", "--batch-size", "16", "--save-every-minutes", "1e-6", on_step=look)
    assert seen == [{"epoch_step": 1, "loss_sums": seen[0]["loss_sums"]},
                    {"epoch_step": 2, "loss_sums": seen[1]["loss_sums"]},
                    {"epoch_step": 3, "loss_sums": seen[2]["loss_sums"]}]
    assert checkpoint.read(str(tmp_path / "run" / "last.pt"))["position"] is None  # the epoch's end


def _agents(out, nodes, nproc, *extra):
    """`nodes` torchrun agents on this host as separate nodes (c10d rendezvous on the loopback),
    in one process group, as a scheduler's job step."""
    port, procs = _free_port(), []
    for node in range(nodes):
        procs.append(subprocess.Popen(
            [os.path.join(PYTHON_BIN, "torchrun"), "--nnodes", str(nodes), "--node-rank", str(node),
             "--nproc_per_node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "cluster-test", WORKER, *BASE, *RUN, "--output", str(out), *extra],
            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            process_group=procs[0].pid if procs else 0))
    return procs


def _stop_job_after_first_epoch(procs, out, timeout=300):
    """SIGTERM to every process of the job once epoch 1 is in metrics.jsonl; the agents' output."""
    deadline = time.monotonic() + timeout
    while not (os.path.isfile(out / "metrics.jsonl") and report.read_metrics(str(out))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "the run ended or hung"
        time.sleep(0.05)
    os.killpg(procs[0].pid, signal.SIGTERM)
    return [p.communicate(timeout=120) for p in procs]


@pytest.mark.parametrize("first, then", [("two nodes", "one node"), ("one node", "two nodes")])
def test_a_run_over_two_nodes_is_stopped_and_resumes_on_one_node_and_the_reverse(tmp_path, straight, first, then):
    out = tmp_path / "run"
    nodes = {"two nodes": (2, 1), "one node": (1, 2)}
    outputs = _stop_job_after_first_epoch(_agents(out, *nodes[first]), out)
    assert any("preempted: SIGTERM" in err for _, err in outputs), outputs[0][1][-3000:]
    procs = _agents(out, *nodes[then], "--resume", "auto")
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert_same_run(out, straight["two"])


def _in_process(tmp_path, *extra, on_step=None, name="run"):
    args = cli.parser().parse_args(BASE + ["--batch-size", "32", "--train-items", "64", "--val-items", "32",
                                           "--output", str(tmp_path / name), *extra])
    return run.train(args, on_step=on_step)


def test_resume_keeps_the_runs_epochs_and_ema_and_chooses_best_by_one_column(tmp_path, capsys):
    _in_process(tmp_path, "--epochs", "3", "--model-ema", "0.9", "--stop-after", "1", name="resumed")
    _in_process(tmp_path, "--resume", str(tmp_path / "resumed" / "last.pt"), name="resumed")  # no --epochs, --model-ema
    _in_process(tmp_path, "--epochs", "3", "--model-ema", "0.9", name="straight")
    saved = checkpoint.read(str(tmp_path / "resumed" / "last.pt"))
    assert saved["epoch"] == 3 and saved["args"]["epochs"] == 3
    assert saved["model_ema"] is not None and saved["args"]["model_ema"] == 0.9
    assert saved["args"]["best_metric"] == "val_top1_ema"
    assert_same_run(tmp_path / "resumed", tmp_path / "straight")
    ema = checkpoint.read(str(tmp_path / "straight" / "last.pt"))["model_ema"]
    assert all(torch.equal(saved["model_ema"][k], ema[k]) for k in ema)


def test_resume_prints_each_option_it_changes_and_refuses_changing_a_fixed_one(tmp_path, capsys):
    _in_process(tmp_path, "--epochs", "2", "--stop-after", "1")
    capsys.readouterr()
    _in_process(tmp_path, "--resume", str(tmp_path / "run" / "last.pt"), "--epochs", "3", "--lr", "2e-4")
    out = capsys.readouterr().out
    assert "changed: --epochs 2 -> 3, --lr 0.000125 -> 0.0002" in out, out
    assert main(BASE + ["--resume", str(tmp_path / "run" / "last.pt"), "--seed", "5"]) == 2
    assert "--seed (0, now 5)" in capsys.readouterr().err


def test_resume_auto_starts_a_run_then_continues_it_and_refuses_other_fixed_options(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = BASE + ["--batch-size", "32", "--train-items", "64", "--val-items", "32", "--epochs", "2",
                   "--output", out, "--resume", "auto"]
    assert main(args + ["--stop-after", "1"]) == 0 and len(report.read_metrics(out)) == 1
    assert main(args) == 0 and [r["epoch"] for r in report.read_metrics(out)] == [1, 2]
    assert main(args + ["--batch-size", "16"]) == 2
    assert "--batch-size (32, now 16)" in capsys.readouterr().err
    assert main(BASE + ["--resume", "auto"]) == 2
    assert "--resume auto continues the run in --output" in capsys.readouterr().err


def test_a_dataset_at_another_path_resumes_when_it_is_the_same_data_and_is_refused_naming_what_differs(
        tmp_path, capsys):
    tree = _image_tree(tmp_path / "data")
    common = ["--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1",
                         "--img-size", "32", "--batch-size", "4", "--epochs", "2", "--workers", "0"]
    out = str(tmp_path / "run")
    assert main(common + ["--data", str(tree), "--output", out, "--stop-after", "1"]) == 0
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, moved)
    last = os.path.join(out, "last.pt")
    assert main(["--resume", last, "--data", f"{moved}/", "--workers", "0", "--no-progress"]) == 0  # trailing slash
    printed = capsys.readouterr().out
    assert f"data moved: {tree} -> {moved}" in printed, printed
    classes = sorted(os.listdir(moved / "train"))
    os.remove(os.path.join(moved, "train", classes[0], sorted(os.listdir(moved / "train" / classes[0]))[0]))
    assert main(["--resume", last, "--data", str(moved), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "is not the run's data" in err and "train items" in err, err


def _mount_tmpfs(folder, options):
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount (a small tmpfs) to make a read-only or full file system")
    return folder


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def make(name, options):
        mounted.append(_mount_tmpfs(tmp_path / name, options))
        return mounted[-1]
    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_read_only_output_is_refused_in_one_line_before_data_or_model_are_built(tmpfs, capsys, monkeypatch):
    read_only = tmpfs("ro", "ro,size=1m")

    def must_not_build(*args, **kwargs):
        raise AssertionError("built before --output was checked")
    monkeypatch.setattr(build, "model_and_data", must_not_build)
    assert main(BASE + ["--output", str(read_only / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0] == f"error: --output {read_only / 'run'}: not writable (Read-only file system)"


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_full_disk_while_saving_is_one_line_exit_74_no_tmp_and_the_previous_checkpoint_intact(tmpfs, ranks):
    disk = tmpfs(f"disk{ranks}", "size=64m")  # a checkpoint is ~20 MB: last.pt and best.pt fit
    out = disk / "run"
    launch = trainer if ranks == 1 else torchrun
    failed = launch(out, event="fill-disk:12")  # after epoch 1's save: epoch 2's save finds the disk full
    assert failed.returncode != 0
    lines = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert lines == [f"error: cannot write {out / 'last.pt'}: No space left on device"], failed.stderr[-3000:]
    if ranks == 1:
        assert failed.returncode == EXIT_WRITE
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    saved = checkpoint.read(str(out / "last.pt"))
    assert saved["epoch"] == 1 and saved["position"] is None


def test_a_run_stopped_mid_epoch_resumes_at_another_world_size_with_the_epochs_mean_loss(tmp_path, straight):
    """2 ranks stopped mid-epoch 2, resumed in one process: the epoch's train loss is the mean
    over all its steps and ranks (the saved per-rank sums counted in the new world's units), as
    the uninterrupted 2-rank run's within the spread of other random draws (not twice the first
    half's, which the sums taken as they are would give)."""
    out = tmp_path / "run"
    stopped = torchrun(out, "--grad-accum-steps", "2", event="sigterm-parent:14")
    assert "preempted: SIGTERM at epoch 2, step 5/10" in stopped.stderr, stopped.stderr[-3000:]
    resumed = trainer(out, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = report.read_metrics(str(out))[1], report.read_metrics(str(straight["two"]))[1]
    assert abs(got["train_loss"] - want["train_loss"]) < 0.05 * want["train_loss"], (got, want)


def test_a_checkpoint_without_positions_or_fingerprints_resumes_and_a_moved_folder_is_refused(tmp_path, capsys):
    """last.pt as written before mid-epoch positions, data fingerprints and recorded options:
    it resumes (its saved options standing as given), and --data at another path is refused,
    since there is no fingerprint to compare."""
    _in_process(tmp_path, "--epochs", "2", "--stop-after", "1")
    path = str(tmp_path / "run" / "last.pt")
    old = checkpoint.read(path)
    for key in ("position", "data", "checksum"):
        old.pop(key)
    for key in ("given", "best_metric"):
        old["args"].pop(key)
    checkpoint.save(path, old)
    assert main(["--resume", path, "--no-progress", "--threads", "1"]) == 0
    assert [r["epoch"] for r in report.read_metrics(str(tmp_path / "run"))] == [1, 2]
    tree = _image_tree(tmp_path / "data")
    _in_process(tmp_path, "--data", str(tree), "--img-size", "32", "--batch-size", "4", "--epochs", "2",
                "--workers", "0", "--stop-after", "1", name="folder")
    path = str(tmp_path / "folder" / "last.pt")
    old = checkpoint.read(path)
    old.pop("data")
    checkpoint.save(path, {k: v for k, v in old.items() if k != "checksum"})
    shutil.copytree(tree, tmp_path / "moved")
    capsys.readouterr()
    assert main(["--resume", path, "--data", str(tmp_path / "moved"), "--no-progress", "--workers", "0"]) == 2
    assert "has no fingerprint" in capsys.readouterr().err
