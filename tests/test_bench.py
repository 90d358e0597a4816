"""The benchmarks tell the truth: bench_attn.py --quick end to end, and the arithmetic of
benchmarks/common/measure.py (bytes saved for backward, bandwidth) on hand-computed cases."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.common import cases, checks, measure, report  # the repository root is on the path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"



# ---------------------------------------------------------------- bytes saved for backward

def test_saved_bytes_of_a_product_counts_both_factors():
    x = torch.randn(10, 3, requires_grad=True)      # 30 floats: 120 bytes
    y = torch.randn(10, 3, requires_grad=True)
    with measure.SavedTensorsCounter() as c:
        z = x * y                                    # mul saves x and y
    assert c.count == 2
    assert c.nbytes == 2 * 30 * 4
    assert c.nbytes_excluding(x) == 30 * 4
    assert c.nbytes_excluding(x, y) == 0
    z.sum().backward()                               # the hooks leave backward working
    assert torch.equal(x.grad, y.detach())


def test_saved_bytes_counts_one_storage_once():
    packed = torch.randn(4, 2, 5, requires_grad=True)   # 40 floats: 160 bytes
    a, b = packed.unbind(1)                               # two views of one storage
    with measure.SavedTensorsCounter() as c:
        out = a * b                                       # saves both views
        out2 = a * a                                      # the same view twice
    assert c.count == 4
    assert c.nbytes == 160                                # one storage, counted once
    (out + out2).sum().backward()
    assert packed.grad is not None


def test_saved_bytes_counts_the_whole_storage_of_a_view():
    big = torch.randn(100)                                # 400 bytes
    w = torch.randn(10, requires_grad=True)
    view = big[:10]                                       # 40 bytes of elements, 400 of storage
    with measure.SavedTensorsCounter() as c:
        (w * view).sum()                                  # saves view only (w's gradient needs it;
    assert c.count == 1                                   # view needs no gradient, so w is not saved)
    assert c.nbytes == 400


def test_saved_bytes_helper_and_no_grad():
    x = torch.randn(8, 8, requires_grad=True)             # 256 bytes
    total, without_inputs = measure.saved_bytes(lambda t: (t @ t).exp(), x, exclude=(x,))
    # mm saves x (as both operands: one storage), exp saves its result (8 x 8 floats)
    assert total == 256 + 256
    assert without_inputs == 256
    with torch.no_grad(), measure.SavedTensorsCounter() as c:
        x * x
    assert c.nbytes == 0


# ---------------------------------------------------------------- bandwidth arithmetic

def test_attention_io_bytes_by_hand():
    # B=2, L=49, H=4, D=16, bf16: q, k, v, out each 2*49*4*16 = 6272 elements of 2 bytes
    assert measure.attention_io_bytes(2, 49, 4, 16, 2) == 4 * 6272 * 2 == 50176


def test_bandwidth_by_hand():
    assert measure.copy_bytes(1000) == 2000
    assert measure.bandwidth(3e9, 1e-3) == pytest.approx(3e12)           # 3 GB in 1 ms: 3 TB/s
    # 1.5e9 bytes in 1 ms is 1.5 TB/s, half of a 3 TB/s copy
    assert measure.bandwidth_fraction(1_500_000_000, 1e-3, 3e12) == pytest.approx(0.5)
    assert measure.bandwidth_fraction(1, 1.0, None) != measure.bandwidth_fraction(1, 1.0, None)   # NaN
    assert measure.bandwidth(1, 0.0) != measure.bandwidth(1, 0.0)


def test_summarize_and_ratio():
    s = measure.summarize([0.004, 0.001, 0.002, 0.003, 0.005])   # seconds
    assert s["median"] == pytest.approx(3.0) and s["n"] == 5
    assert s["min"] == pytest.approx(1.0) and s["max"] == pytest.approx(5.0)
    assert s["q1"] == pytest.approx(2.0) and s["q3"] == pytest.approx(4.0) and s["iqr"] == pytest.approx(2.0)
    assert measure.summarize([0.002])["iqr"] == 0
    assert measure.ratio(6.0, 2.0) == 3.0
    assert measure.ratio(None, 2.0) is None and measure.ratio(1.0, 0) is None


def test_check_close():
    exact = torch.randn(50, dtype=torch.float64)
    assert measure.check_close(exact.float(), exact)[0]
    assert not measure.check_close(exact.float() + 1e-2, exact)[0]
    bad = exact.float().clone()
    bad[3] = float("nan")
    assert not measure.check_close(bad, exact)[0]
    low = exact.bfloat16()
    assert measure.check_close(low, exact, low)[0]                       # as good as itself
    assert not measure.check_close(low + 0.5, exact, low)[0]
    assert not measure.check_close(exact.float()[:10], exact)[0]         # shape


# ---------------------------------------------------------------- where results go

@pytest.mark.parametrize("script", ["bench_attn", "bench_model", "bench_dense"])
def test_default_output_folder_is_ignored_by_git(script):
    """`make bench` must leave a clone clean: every benchmark writes to benchmarks/out/ (ignored)
    unless --out names another folder; benchmarks/results/ (committed) only on request."""
    import importlib
    from benchmarks.common.cli import OUT, RESULTS
    module = importlib.import_module(f"benchmarks.{script}")
    assert Path(module.parse_args([]).out) == OUT != RESULTS
    try:
        proc = subprocess.run(["git", "check-ignore", "-q", str(OUT / f"{script}_cpu_float32.json")], cwd=ROOT)
    except OSError:
        pytest.skip("no git")
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, f"{OUT} is not ignored by git: a benchmark run would dirty the clone"
    recipe = re.search(r"^bench:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe and "bench_attn.py" in recipe.group(1) and "results" not in recipe.group(1), \
        "make bench must run bench_attn.py into its default folder"


# ---------------------------------------------------------------- the benchmark, end to end

def _run(script, *args, timeout=240, interpret=False):
    """Runs a benchmark script; interpret=True runs it on CPU tensors under the Triton
    interpreter (the dry run of a GPU-only script), else without it (benchmarks never time
    the interpreter)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("script", ["bench_attn.py", "bench_model.py", "bench_dense.py", "tools/gpu_breakdown.py",
                                    "tools/tune_triton.py"])
def test_a_cuda_device_this_machine_lacks_is_one_line_before_anything_runs(script, tmp_path):
    """--device cuda on a CPU machine: argparse's usage and one error line naming the device and
    torch.cuda.is_available(), exit status 2, no traceback and nothing written; a device name
    torch does not know is the same. (The GPU tools take no --out.)"""
    out = [] if script.startswith("tools/") else ["--out", str(tmp_path / "out")]
    for device, says in (("cuda", "this machine has no CUDA device"), ("foo", "--device foo: ")):
        proc = _run(script, "--device", device, *out, timeout=120)
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_a_cuda_index_past_the_machines_devices_is_one_line(monkeypatch, capsys):
    """cuda:5 on a machine with one GPU (torch.cuda's answers stubbed): argparse's error, exit 2."""
    import argparse
    from benchmarks.common.cli import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as exited:
        resolve_device(argparse.ArgumentParser(prog="bench"), "cuda:5")
    assert exited.value.code == 2 and "--device cuda:5: this machine has 1 CUDA device(s)" in capsys.readouterr().err
    assert resolve_device(argparse.ArgumentParser(prog="bench"), "cpu") == torch.device("cpu")


def test_bench_attn_quick(tmp_path):
    proc = _run("bench_attn.py", "--quick", "--device", "cpu", "--no-progress", "--threads", "1",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "bench_attn_cpu_float32.json" in files, files
    report = json.loads((tmp_path / "bench_attn_cpu_float32.json").read_text())

    assert report["device"]["kind"] == "cpu" and report["device"]["name"]
    assert report["versions"]["torch"] == torch.__version__ and "triton" in report["versions"]
    assert report["git"]["commit"]
    assert report["date"][:2] == "20"
    assert report["args"]["quick"] is True and report["args"]["batch"] == 2
    assert report["all_checks_passed"] is True
    assert [s["stage"] for s in report["shapes"]] == [1, 4]
    for shape in report["shapes"]:
        names = [r["name"] for r in shape["rows"]]
        assert {"reference", "paper", "torch", "sdpa-windows"} <= set(names), names
        for r in shape["rows"]:
            assert r["status"] == "ok" and r["check"]["passed"], r
            for key in ("fwd_ms", "fwdbwd_ms"):
                assert r[key]["median"] > 0 and r[key]["n"] >= 1 and r[key]["iqr"] >= 0
            for key in ("speedup_vs_torch_fwd", "speedup_vs_torch_fwdbwd", "speedup_vs_paper_fwd",
                        "ratio_to_sdpa_windows_fwd", "ratio_to_sdpa_windows_fwdbwd"):
                assert r[key] > 0, (r["name"], key)
            assert r["saved_bytes"] >= r["saved_bytes_excluding_inputs"] > 0
            assert r["device_fwd_ms"] is None and r["device_speedup_vs_torch_fwd"] is None   # no device clock on CPU
        torch_row = next(r for r in shape["rows"] if r["name"] == "torch")
        assert torch_row["speedup_vs_torch_fwd"] == pytest.approx(1.0)
        # the packed qkv is saved by every path that keeps q, k, v: at least its size
        qkv_bytes = 3 * shape["batch"] * shape["length"] * shape["channels"] * 4
        assert shape["io_bytes"] == 4 * qkv_bytes // 3
        ref = next(r for r in shape["rows"] if r["name"] == "reference")
        assert ref["saved_bytes"] >= qkv_bytes
        assert shape["index_check"]["backend"] in names and shape["index_check"]["fwd_checked_ms"]["median"] > 0
    assert report["timing"]["device_time"].startswith("n/a")
    assert "reference" in proc.stdout and "x torch" in proc.stdout and "dev x torch" not in proc.stdout


def test_bench_model_quick(tmp_path):
    proc = _run("bench_model.py", "--quick", "--device", "cpu", "--no-progress", "--threads", "1",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "bench_model_cpu_float32.json").read_text())
    assert report["device"]["kind"] == "cpu" and report["git"]["commit"]
    rows = {r["backend"]: r for r in report["rows"]}
    assert "reference" in rows
    ref = rows["reference"]
    assert ref["train_step_ms"]["median"] > 0 and ref["train_images_per_s"] > 0
    assert ref["infer_images_per_s"] > 0 and ref["saved_bytes_per_image"] > 0
    assert ref["mode"] == "eager" and report["modes"] == ["eager"]          # CPU default: no compiled modes


def test_gpu_scripts_dry_run():
    """The scripts a lent GPU runs (gpu_check.sh: breakdown and tune) must not rot between
    lends: their --device cpu dry runs check every code path but the CUDA timers. tune_triton
    checks its configuration against the reference before timing it."""
    proc = _run("tools/tune_triton.py", "--device", "cpu", "--batch", "1", "--stages", "4",
                "--warps", "4", "--hpp", "8", interpret=True, timeout=300)
    assert proc.returncode == 0 and "ok (max rel err" in proc.stdout, proc.stdout + proc.stderr
    proc = _run("tools/gpu_breakdown.py", "--device", "cpu", "--dtype", "float32", "--batch", "1",
                "--stages", "4", "--calls", "1", "--reps", "1", interpret=True, timeout=300)
    import rsir_kernels as rk
    cpp_missing = not rk.available_backends()["cpp"].available  # its row then says why, as an ERR cell
    errors = [line for line in proc.stdout.splitlines()
              if " ERR " in line and not (cpp_missing and line.startswith("cpp"))]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line[:1].isalpha()]
    assert {"triton", "paper", "torch", "sdpa-windows"} <= set(rows), proc.stdout
    assert proc.stdout.count("triton host:") == 7


@pytest.mark.gpu
def test_bench_attn_quick_gpu(tmp_path):
    """The CUDA paths: event timing, peak memory, copy bandwidth (bf16, the GPU defaults)."""
    proc = _run("bench_attn.py", "--quick", "--device", "cuda", "--no-progress", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "bench_attn_cuda_bfloat16.json").read_text())
    assert report["device"]["kind"] == "cuda" and report["all_checks_passed"] is True
    copy = report["copy_bandwidth"]
    assert copy["bytes_moved"] == 2 * copy["tensor_bytes"] and copy["bytes_per_s"] > 1e10
    for shape in report["shapes"]:
        for r in shape["rows"]:
            assert r["peak_fwdbwd"]["peak_above_start_bytes"] > 0
            assert 0 < r["copy_bw_fraction_fwd"] < 2, r["name"]   # io bytes / time over the copy bandwidth
            if r["kind"] == "backend":   # the fused kernels capture in a CUDA graph; device time <= eager time
                assert 0 < r["device_fwd_ms"]["median"] <= 1.5 * r["fwd_ms"]["median"], r["name"]
    assert "%copyBW" in proc.stdout and "dev x torch f" in proc.stdout


# ---------------------------------------------------------------- the check and the FAILED path

def test_check_row_catches_a_wrong_row_and_passes_the_baselines():
    shape = cases.Shape(stage=1, height=14, width=14, channels=32, heads=2)
    inp = cases.make_inputs(shape, 1, "cpu", torch.float32)
    exact = checks.exact_reference(inp, torch.float64)
    rows = {r.name: r for r in cases.baseline_rows(inp) + [cases.backend_row("reference", inp)]}
    for name, row in rows.items():
        assert checks.check_row(row, exact, None)["passed"], name
    good = rows["torch"]
    wrong = cases.Row("wrong", "backend", lambda qkv: good.fn(qkv) * 1.001, good.leaves, good.dout, good.expected)
    result = checks.check_row(wrong, exact, None)
    assert not result["passed"] and "FAILED" in result["detail"]

    def boom(qkv):
        raise RuntimeError("kernel exploded")
    crashed = checks.check_row(cases.Row("boom", "backend", boom, good.leaves, good.dout, good.expected), exact, None)
    assert not crashed["passed"] and "kernel exploded" in crashed["detail"]


def test_table_prints_failed_rows_without_speedups():
    timing = {"median": 2.0, "iqr": 0.1}
    ok = {"name": "torch", "kind": "baseline", "status": "ok", "fwd_ms": timing, "fwdbwd_ms": timing,
          "speedup_vs_torch_fwd": 1.0, "speedup_vs_torch_fwdbwd": 1.0, "speedup_vs_paper_fwd": None,
          "ratio_to_sdpa_windows_fwd": None, "saved_bytes": 2 ** 20}
    bad = {"name": "cpp", "kind": "backend", "status": "FAILED", "check": {"passed": False, "detail": "out: rel err 1"}}
    result = {"device": {"kind": "cpu"}, "shapes": [{"stage": 1, "height": 56, "width": 56, "rows": [bad, ok],
                                                     "index_check": None, "skipped_backends": {"triton": "no GPU"}}]}
    table = report.format_table(result)
    line = next(line for line in table.splitlines() if " cpp " in line)
    assert "FAILED" in line and line.split("FAILED", 1)[1].strip() == ""   # no figures after it
    assert "cpp FAILED (not timed" in table and "triton not run: no GPU" in table


# ---------------------------------------------------------------- device time (CUDA-graph replays)

class FakeGraphs:
    """Stands in for timing.CudaGraphs on a CPU: capture runs fn once (as a warm-up would) and
    returns a replay; replay i of a time() call takes (i + 1) ms; fns whose result is the
    string "no capture" fail to capture, as a call with a host sync inside would."""

    def __init__(self):
        self.captured, self.order, self.released = 0, [], 0

    def capture(self, fn):
        if fn() == "no capture":
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captured += 1
        return lambda i=self.captured - 1: self.order.append(i)

    def estimate(self, replay):
        return 1e-3

    def time(self, replays, reps):
        for _ in range(reps):
            for replay in replays:
                replay()
        return [[(i + 1) * 1e-3] * reps for i in range(len(replays))]

    def release(self):
        self.released += 1


def test_device_timer_is_absent_on_cpu_and_interleaves_replays():
    from benchmarks.common import timing
    policy = timing.TimingPolicy(warmup=0, min_reps=3, max_reps=4, budget_s=0.0)
    cpu = timing.device_timer(torch.device("cpu"), policy)
    assert not cpu.available and cpu.interleaved([lambda: None]) is None

    graphs = FakeGraphs()
    timer = timing.DeviceTimer(policy, graphs)
    result = timer.interleaved([lambda: 1, lambda: "no capture", lambda: 3])
    assert result[0] == [1e-3] * 3 and result[2] == [2e-3] * 3          # min_reps: the budget is 0
    assert isinstance(result[1], str) and "capture failed" in result[1] and "stream is capturing" in result[1]
    assert graphs.order == [0, 1] * 3                                     # round-robin, captured ones only
    assert graphs.released == 1


def test_device_times_give_kernel_against_kernel_ratios(tmp_path):
    """bench_shape with a stand-in device clock: the device columns are the ratios of the
    device medians (hand-computed here from the fake's 1, 2, 3... ms), independent of the
    eager columns, and the table prints them."""
    from types import SimpleNamespace

    from benchmarks.common import attn_measure, progress, timing
    shape = cases.Shape(stage=4, height=7, width=7, channels=32, heads=4)
    policy = timing.TimingPolicy(warmup=0, min_reps=2, max_reps=2, budget_s=0.0)
    args = SimpleNamespace(batch=1, seed=0, backends=["reference"])
    result = attn_measure.bench_shape(shape, args, torch.device("cpu"), torch.float32,
                                      timing.Timer(torch.device("cpu"), policy), progress.Progress(0, enabled=False),
                                      None, timing.DeviceTimer(policy, FakeGraphs()))
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    names = [r["name"] for r in rows]
    assert names == ["reference", "paper", "torch", "sdpa-windows"]
    ms = {n: float(i + 1) for i, n in enumerate(names)}                 # the fake's replay times
    for r in rows:
        for short in ("fwd", "fwdbwd"):
            assert r[f"device_{short}_ms"]["median"] == pytest.approx(ms[r["name"]])
            assert r[f"device_speedup_vs_torch_{short}"] == pytest.approx(ms["torch"] / ms[r["name"]])
            assert r[f"device_ratio_to_sdpa_windows_{short}"] == pytest.approx(ms[r["name"]] / ms["sdpa-windows"])
        # the eager columns still come from the eager timer
        assert r["speedup_vs_torch_fwd"] == pytest.approx(
            next(x for x in rows if x["name"] == "torch")["fwd_ms"]["median"] / r["fwd_ms"]["median"])
    table = report.format_table({"device": {"kind": "cpu"}, "shapes": [result]})
    assert "dev x torch f" in table
    ref_line = next(line for line in table.splitlines() if " reference " in line)
    assert f"{ms['torch'] / ms['reference']:.2f}" in ref_line.split()        # 3.00


# ---------------------------------------------------------------- bench_model: eager and compiled modes

def test_model_modes_and_speedups_against_the_reference_of_each_mode():
    from benchmarks import bench_model
    from benchmarks.common import model_measure
    assert model_measure.resolve_modes(["reduce-overhead", "eager"], torch.device("cpu")) == \
        (["eager"], {"reduce-overhead": "CUDA graphs need a CUDA device"})
    assert model_measure.resolve_modes(["compile", "reduce-overhead"], torch.device("cuda"))[0] == \
        ["compile", "reduce-overhead"]
    with pytest.raises(ValueError, match="--modes"):
        model_measure.resolve_modes(["jit"], torch.device("cpu"))
    assert bench_model.parse_args(["--device", "cpu"]).modes == ["eager"]
    with pytest.raises(SystemExit):
        bench_model.parse_args(["--device", "cpu", "--modes", "eager,fast"])

    def t(ms):
        return {"median": ms}
    rows = [{"backend": "reference", "mode": "eager", "train_step_ms": t(80.0), "infer_ms": t(20.0)},
            {"backend": "triton", "mode": "eager", "train_step_ms": t(40.0), "infer_ms": t(10.0)},
            {"backend": "reference", "mode": "compile", "train_step_ms": t(50.0)},
            {"backend": "triton", "mode": "compile", "train_step_ms": t(25.0)},
            {"backend": "cpp", "mode": "compile", "check_passed": False, "logits_rel_err_vs_eager": 0.5}]
    bench_model.add_speedups(rows)
    assert rows[1]["train_speedup_vs_reference"] == pytest.approx(2.0)        # 80 / 40
    assert rows[1]["infer_speedup_vs_reference"] == pytest.approx(2.0)        # 20 / 10
    assert rows[1]["train_speedup_vs_best_reference"] == pytest.approx(1.25)  # compiled reference: 50 / 40
    assert rows[3]["train_speedup_vs_reference"] == pytest.approx(2.0)        # 50 / 25, same mode
    assert "train_speedup_vs_reference" not in rows[4]
    for r in rows[:4]:
        r.update(train_images_per_s=1.0, check_passed=True, compile_s=1.0, logits_rel_err_vs_eager=0.0)
        if "infer_ms" in r:
            r.update(infer_images_per_s=1.0, saved_bytes_per_image=2 ** 20, logits_rel_err_vs_reference=0.0)
    table = report.format_model_table(rows, {"reduce-overhead": "CUDA graphs need a CUDA device"}, gpu=False)
    line = next(x for x in table.splitlines() if x.startswith("triton") and "compile" in x)
    assert "25.0" in line and "2.00" in line and "vs eager" in line
    assert "cpp        compile         FAILED: logits rel err vs eager 5.0e-01" in table
    assert "reduce-overhead not run" in table


def _attention_macs_by_formula(config, height, width, batch=1):
    """The window attention's multiply-adds of an RSIR model by hand: per layer 2 * L * N * C
    (q k^T and P v, each query row against the N = min(49, L) keys of its window)."""
    side_h, side_w = -(-height // 4), -(-width // 4)      # the stem: stride 4 after padding to a multiple
    total = 0
    for depth, dim in zip(config.depths, config.stage_dims()):
        tokens = side_h * side_w
        total += depth * 2 * batch * tokens * min(config.window_size ** 2, tokens) * dim
        side_h, side_w = -(-side_h // 2), -(-side_w // 2)  # the 3x3 stride-2 merges: ceil
    return total


def test_bench_dense_quick(tmp_path):
    """bench_dense.py --quick end to end: a row per model, ratios that are the quotients of the
    same JSON's medians, a peak and an attention share per row, and the RSIR attention FLOPs
    FlopCounterMode counted equal to the formula's. (19-45 s on 2 loaded cores: imports,
    eight model builds, FLOPs, two profiles and two timed calls per row.)"""
    from rsir_kernels.models import rsir_tiny
    # the GPU command's backends: triton is skipped on a CPU with its reason, the rest runs
    proc = _run("bench_dense.py", "--quick", "--device", "cpu", "--threads", "1", "--backend", "triton,cpp",
                "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "dense_cpu.json").read_text())
    assert report["git"]["commit"] and report["device"]["kind"] == "cpu" and "bench_dense.py" in report["command"]
    (size,) = report["sizes"]
    rows = {r["row"]: r for r in size["rows"]}
    assert set(rows) == {"swin", "cpp", "reference", "swin body", "cpp body"}
    assert "triton" in report["skipped_backends"]
    for r in rows.values():
        for key in ("forward_ms", "forward_backward_ms"):
            assert r[key]["median"] > 0 and r[key]["n"] == 1
        assert 0 < r["profile_forward"]["attention_share"] < 1
        assert 0 < r["profile_forward_backward"]["attention_share"] < 1
        if r["train_peak"] is not None:                   # None only without /proc/self/clear_refs
            assert r["train_peak"]["peak_above_start_bytes"] > 0
    for name in ("cpp", "reference"):
        for other in ("swin", "reference"):
            for key in ("forward", "forward_backward"):
                if name == other:
                    assert f"time_ratio_to_{other}_{key}" not in rows[name]
                    continue
                expected = rows[name][f"{key}_ms"]["median"] / rows[other][f"{key}_ms"]["median"]
                assert rows[name][f"time_ratio_to_{other}_{key}"] == pytest.approx(expected, rel=1e-12)
    for key in ("forward", "forward_backward"):       # a body row against the other body row
        expected = rows["cpp body"][f"{key}_ms"]["median"] / rows["swin body"][f"{key}_ms"]["median"]
        assert rows["cpp body"][f"time_ratio_to_swin_{key}"] == pytest.approx(expected, rel=1e-12)
        assert f"time_ratio_to_reference_{key}" not in rows["cpp body"]
    (flops,) = report["flops"]
    counts = flops["counts"]
    expected = _attention_macs_by_formula(rsir_tiny().config, flops["height"], flops["width"])
    assert counts["cpp"]["attention_macs"] == expected
    assert counts["swin"]["attention_macs"] > 0
    for c in counts.values():
        assert c["macs"] == c["flops"] / 2 and c["body_macs"] + c["fpn_macs"] == pytest.approx(c["macs"])
    assert "swin" in proc.stdout and "rsir_tiny" in proc.stdout
