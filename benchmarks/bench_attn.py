#!/usr/bin/env python3
"""Window attention benchmark (the project's main job: `make bench`).

For each stage of RSIR-T (or RSIR-B with --model base) at 224x224, window 7x7 (N = 49),
G = 2 (RS-Win order and IR-Win order stacked), it times every available backend of
rsir_kernels (through rsir_kernels.ops.window_attention) and the baselines of DESIGN.md
section 5 on the same inputs, after checking each one's output and gradient against
rsir_kernels.reference:

    paper         Algorithms 1/2 of the paper literally (baselines.paper_rsir_attention)
    torch         the best pure-PyTorch path (baselines.torch_window_attention)
    sdpa-windows  SDPA alone on already-gathered windows (baselines.sdpa_windows): the floor

Prints a table, writes <out>/bench_attn_<device>_<dtype>[_base].json and a .png of the
speedups over `torch`. See benchmarks/README.md for what each column means.

    PYTHONPATH=. python benchmarks/bench_attn.py                 # CPU fp32 batch 8, or GPU bf16 batch 64
    PYTHONPATH=. python benchmarks/bench_attn.py --quick --out /tmp/b   # a few seconds (CI smoke test)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0 if _p == str(HERE) else len(sys.path), _p)

import torch  # noqa: E402

import measure  # noqa: E402
from rsir_kernels import backends, baselines, ops, reference  # noqa: E402
from rsir_kernels.models import RSIR_B, RSIR_T  # noqa: E402
from rsir_kernels.samplers import ir_index, rs_index, window_order  # noqa: E402

WINDOW = 7
N = WINDOW * WINDOW
GROUPS = 2
BASELINES = ("paper", "torch", "sdpa-windows")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "float64": torch.float64, "fp64": torch.float64}


# ---------------------------------------------------------------- shapes and inputs

@dataclasses.dataclass(frozen=True)
class Shape:
    stage: int       # 1-based
    height: int
    width: int
    channels: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.channels // self.heads

    @property
    def length(self) -> int:
        return self.height * self.width

    def describe(self) -> str:
        return f"{self.height}x{self.width} C{self.channels} H{self.heads} D{self.head_dim}"


def stage_shapes(model: str = "tiny", image: int = 224) -> list[Shape]:
    """The attention shapes of the four stages of RSIR-T ('tiny') or RSIR-B ('base')."""
    config = {"tiny": RSIR_T, "base": RSIR_B}[model]
    shapes = []
    for i, (dim, heads) in enumerate(zip(config.stage_dims(), config.num_heads)):
        side = image // (4 * 2 ** i)
        shapes.append(Shape(i + 1, side, side, dim, heads))
    return shapes


@dataclasses.dataclass
class Inputs:
    shape: Shape
    qkv: torch.Tensor          # (B, L, 3, H, D) leaf, requires_grad
    index: torch.Tensor        # (B, 2, L) int64: RS-Win order, IR-Win order (window order)
    ids_shuffles: list         # the paper's raw ids_shuffle (B, L) for RS and IR
    dout: torch.Tensor         # (B, L, H, D) fixed random output gradient

    @property
    def batch(self) -> int:
        return self.qkv.shape[0]


def make_inputs(shape: Shape, batch: int, device, dtype, seed: int = 0) -> Inputs:
    """Random packed qkv, RS-Win and IR-Win orders built by the samplers on random data."""
    length, heads, dim = shape.length, shape.heads, shape.head_dim
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(batch, length, 3, heads, dim, generator=gen).to(device, dtype).requires_grad_()
    tokens = torch.randn(batch, length, shape.channels, generator=gen)   # the module's input x
    dout = torch.randn(batch, length, heads, dim, generator=gen).to(device, dtype)
    rs = rs_index(batch, shape.height, shape.width, WINDOW,
                  generator=torch.Generator().manual_seed(seed + 1))           # (B, 1, L)
    ir = ir_index(tokens, shape.height, shape.width, WINDOW)                  # (B, 1, L)
    # The paper's baseline takes the raw ids_shuffle; draw it the way the samplers do and
    # make sure it is the same order.
    rs_raw = torch.rand(batch, 1, length, generator=torch.Generator().manual_seed(seed + 1)).argsort(-1)[:, 0]
    ir_raw = tokens.mean(-1).argsort(dim=-1, stable=True)
    assert torch.equal(window_order(rs_raw, shape.height, shape.width, WINDOW), rs[:, 0])
    assert torch.equal(window_order(ir_raw, shape.height, shape.width, WINDOW), ir[:, 0])
    index = torch.cat([rs, ir], dim=1).to(device)
    return Inputs(shape, qkv, index, [rs_raw.to(device), ir_raw.to(device)], dout)


# ---------------------------------------------------------------- rows: what is timed

@dataclasses.dataclass
class Row:
    """One thing to time: fn(*leaves) -> output; backward with dout; `expected` maps the
    reference's (out, dqkv) to the layout of fn's output and of the leaves' gradients."""
    name: str
    kind: str                       # "backend" or "baseline"
    fn: Callable
    leaves: tuple
    dout: torch.Tensor
    expected: Callable


def backend_row(name: str, inp: Inputs) -> Row:
    index = inp.index

    def fn(qkv):
        q, k, v = qkv.unbind(2)
        return ops.window_attention(q, k, v, index, N, backend=name, check_index=False)
    return Row(name, "backend", fn, (inp.qkv,), inp.dout, lambda out, dqkv: (out, (dqkv,)))


def baseline_rows(inp: Inputs) -> list[Row]:
    s, index, ids = inp.shape, inp.index, inp.ids_shuffles

    def paper(qkv):
        q, k, v = qkv.unbind(2)
        return baselines.paper_rsir_attention(q, k, v, ids, s.height, s.width, WINDOW)

    def torch_path(qkv):
        q, k, v = qkv.unbind(2)
        return baselines.torch_window_attention(q, k, v, index, N)

    # sdpa-windows: windows gathered once, outside the timing, contiguous, as 4-D
    # (B, H * nW, N, D) tensors so that SDPA may pick its fused kernels (those take 4-D only).
    def to_windows(*ts):
        return tuple(w.flatten(1, 2) for w in baselines.gather_windows(*ts, index, N))

    with torch.no_grad():
        windows = tuple(w.detach().clone().requires_grad_() for w in to_windows(*inp.qkv.unbind(2)))
        dout_w = to_windows(inp.dout, inp.dout, inp.dout)[0]

    def sdpa_expected(out, dqkv):
        return to_windows(out, out, out)[0], to_windows(*dqkv.unbind(2))

    same = lambda out, dqkv: (out, (dqkv,))  # noqa: E731
    return [Row("paper", "baseline", paper, (inp.qkv,), inp.dout, same),
            Row("torch", "baseline", torch_path, (inp.qkv,), inp.dout, same),
            Row("sdpa-windows", "baseline", baselines.sdpa_windows, windows, dout_w, sdpa_expected)]


def select_backends(requested: Optional[list[str]], q: torch.Tensor) -> tuple[list[str], dict]:
    """Backends to time on inputs like q (B, L, H, D), and {name: why not} for the others."""
    chosen, skipped = [], {}
    for name in backends.names():
        if requested is not None and name not in requested:
            continue
        b = backends.get(name)
        reason = b.unavailable or b.cannot_run(q, N)
        if reason is None and "triton" in name and q.device.type == "cpu" \
                and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            reason = "TRITON_INTERPRET=1: the interpreter is never benchmarked"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    if requested is not None:
        for name in requested:
            if name not in backends.names():
                skipped[name] = f"no such backend (registered: {', '.join(backends.names())})"
    return chosen, skipped


# ---------------------------------------------------------------- correctness

def exact_reference(inp: Inputs, dtype, upcast=True):
    """(out, dqkv) of rsir_kernels.reference on the benchmark inputs, computed in dtype."""
    leaf = inp.qkv.detach().to(dtype).requires_grad_()
    out = reference.window_attention_reference(*leaf.unbind(2), inp.index, N, upcast=upcast)
    (dqkv,) = torch.autograd.grad(out, leaf, inp.dout.to(dtype))
    return out.detach(), dqkv


def check_row(row: Row, exact, low) -> dict:
    """Output and leaf gradients of row vs the float64 reference (DESIGN.md section 4)."""
    try:
        with torch.enable_grad():
            out = row.fn(*row.leaves)
            grads = torch.autograd.grad(out, row.leaves, row.dout)
    except Exception as e:  # noqa: BLE001 - a crashing backend is reported, not fatal
        return {"passed": False, "detail": f"raised {type(e).__name__}: {e}"}
    want_out, want_grads = row.expected(*exact)
    low_out, low_grads = row.expected(*low) if low is not None else (None, [None] * len(grads))
    results = [("out", *measure.check_close(out, want_out, low_out))]
    for i, (g, w, lg) in enumerate(zip(grads, want_grads, low_grads)):
        results.append((f"grad{i}" if len(grads) > 1 else "grad", *measure.check_close(g, w, lg)))
    passed = all(ok for _, ok, _ in results)
    detail = "; ".join(f"{n}: {d}" + ("" if ok else " FAILED") for n, ok, d in results)
    return {"passed": passed, "detail": detail}


# ---------------------------------------------------------------- timing

@dataclasses.dataclass
class TimingPolicy:
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0     # stop after min_reps once this much time was spent


class Timer:
    """Times functions repeatedly: CPU with time.perf_counter around each call; CUDA with CUDA
    events around each call, after flushing the L2 cache (as triton.testing.do_bench).

    `interleaved(fns)` times several functions round-robin (one call of each per round), so
    that a change in background load hits every row of a comparison alike."""

    def __init__(self, device: torch.device, policy: TimingPolicy):
        self.device, self.policy = device, policy
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)

    def __call__(self, fn) -> list[float]:
        return self.interleaved([fn])[0]

    def interleaved(self, fns: list) -> list[list[float]]:
        p = self.policy
        for fn in fns:
            for _ in range(p.warmup):
                fn()
        if self.cuda:
            return self._cuda(fns)
        times = [[] for _ in fns]
        budget = p.budget_s * len(fns)
        rounds, start = 0, time.perf_counter()
        while rounds < p.max_reps and (rounds < p.min_reps or time.perf_counter() - start < budget):
            for fn, out in zip(fns, times):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            rounds += 1
        return times

    def _cuda(self, fns) -> list[list[float]]:
        p = self.policy
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        estimate = max(time.perf_counter() - t0, 1e-6) / len(fns)   # seconds per call
        reps = int(min(p.max_reps, max(p.min_reps, p.budget_s // estimate)))
        events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                   for _ in range(reps)] for _ in fns]
        for r in range(reps):
            for fn, evs in zip(fns, events):
                start, end = evs[r]
                self.flush.zero_()
                start.record()
                fn()
                end.record()
        torch.cuda.synchronize()
        return [[s.elapsed_time(e) / 1e3 for s, e in evs] for evs in events]


def forward_fn(row: Row):
    def run():
        with torch.no_grad():
            return row.fn(*row.leaves)
    return run


def forward_backward_fn(row: Row):
    def run():
        with torch.enable_grad():
            out = row.fn(*row.leaves)
            return torch.autograd.grad(out, row.leaves, row.dout)
    return run


def peak_memory(fn, device) -> Optional[dict]:
    """CUDA only: peak allocated bytes during fn(), absolute and above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return {"peak_bytes": peak, "peak_above_start_bytes": peak - before}


def copy_bandwidth(device, timer: Timer, nbytes: int = 512 * 1024 * 1024) -> Optional[dict]:
    """Device-to-device copy bandwidth (read + write bytes / median time), CUDA only."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes, dtype=torch.int8, device=device).random_()
    dst = torch.empty_like(src)
    stats = measure.summarize(timer(lambda: dst.copy_(src)))
    moved = measure.copy_bytes(nbytes)
    return {"tensor_bytes": nbytes, "bytes_moved": moved, "time_ms": stats,
            "bytes_per_s": measure.bandwidth(moved, stats["median"] / 1e3)}


# ---------------------------------------------------------------- environment

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def load_average() -> Optional[list]:
    """1, 5, 15-minute load averages (other processes sharing the cores make CPU timings noisy)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def git_commit() -> dict:
    info = {"commit": "unknown", "dirty": None}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10, check=True).stdout.strip() or "unknown"
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout
        info["dirty"] = bool(status.strip())
    except Exception:  # noqa: BLE001 - no git, not a checkout: the commit stays unknown
        pass
    return info


def environment(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    env = {"device": {"kind": device.type, "name": device_name(device)},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "triton": triton_version, "cuda": torch.version.cuda},
           "git": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": load_average(),
                    "triton_interpret": os.environ.get("TRITON_INTERPRET")},
           "backends": {n: {"available": s.available, "reason": s.reason}
                        for n, s in ops.available_backends().items()}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"].update(memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    return env


# ---------------------------------------------------------------- progress

class Progress:
    """tqdm when it is installed, else a plain 'i/n label' line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, label: str):
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_description(label, refresh=False)
            self.bar.update(1)
        elif sys.stderr.isatty():
            print(f"\r  [{self.done}/{self.total}] {label:<60}", end="", file=sys.stderr, flush=True)
        else:
            print(f"  [{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            print(file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one shape

def bench_shape(shape: Shape, args, device, dtype, timer: Timer, progress: Progress,
                copy_bw: Optional[float]) -> dict:
    inp = make_inputs(shape, args.batch, device, dtype, seed=args.seed + shape.stage)
    names, skipped = select_backends(args.backends, inp.qkv[:, :, 0])
    rows = [backend_row(n, inp) for n in names] + baseline_rows(inp)
    exact = exact_reference(inp, torch.float64)
    low = exact_reference(inp, dtype, upcast=False) if dtype in measure.LOW_PRECISION else None
    io_bytes = measure.attention_io_bytes(args.batch, shape.length, shape.heads, shape.head_dim,
                                          inp.qkv.element_size())
    results, timed = [], []
    for row in rows:
        r = {"name": row.name, "kind": row.kind, "status": "ok"}
        r["check"] = check_row(row, exact, low)
        progress.step(f"stage {shape.stage} {row.name} check")
        results.append(r)
        if not r["check"]["passed"]:
            r["status"] = "FAILED"
            continue
        try:  # one forward+backward and one forward outside the timing: a row that raises
            #      here (out of memory, say) is reported and left out of the timing
            r["saved_bytes"], r["saved_bytes_excluding_inputs"] = measure.saved_bytes(row.fn, *row.leaves,
                                                                                     exclude=row.leaves)
            mem = peak_memory(forward_backward_fn(row), device)
            if mem is not None:
                r["peak_fwdbwd"] = mem
                r["peak_fwd"] = peak_memory(forward_fn(row), device)
        except Exception as e:  # noqa: BLE001
            r["status"] = "FAILED"
            r["check"] = {"passed": r["check"]["passed"], "detail": f"raised {type(e).__name__}: {e}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        timed.append((row, r))

    # Rows of one stage are timed round-robin, forward first, then forward + backward.
    for key, make in (("fwd_ms", forward_fn), ("fwdbwd_ms", forward_backward_fn)):
        if timed:
            for (row, r), times in zip(timed, timer.interleaved([make(row) for row, _ in timed])):
                r[key] = measure.summarize(times)
        progress.step(f"stage {shape.stage} {key[:-3]} ({len(timed)} rows interleaved)")
    for _, r in timed:
        r["bytes_per_s_fwd"] = measure.bandwidth(io_bytes, r["fwd_ms"]["median"] / 1e3)
        if copy_bw:
            r["copy_bw_fraction_fwd"] = measure.bandwidth_fraction(io_bytes, r["fwd_ms"]["median"] / 1e3, copy_bw)

    by_name = {r["name"]: r for r in results if r["status"] == "ok"}

    def med(name, key):
        return by_name[name][key]["median"] if name in by_name else None

    for r in results:
        if r["status"] != "ok":
            continue
        for key, short in (("fwd_ms", "fwd"), ("fwdbwd_ms", "fwdbwd")):
            mine = r[key]["median"]
            r[f"speedup_vs_torch_{short}"] = measure.ratio(med("torch", key), mine)
            r[f"speedup_vs_paper_{short}"] = measure.ratio(med("paper", key), mine)
            r[f"ratio_to_sdpa_windows_{short}"] = measure.ratio(mine, med("sdpa-windows", key))

    index_check = None
    timed_backends = [r for r in results if r["kind"] == "backend" and r["status"] == "ok"]
    if timed_backends:
        best = min(timed_backends, key=lambda r: r["fwd_ms"]["median"])
        index_check = bench_index_check(best["name"], inp, timer)
    progress.step(f"stage {shape.stage} index check")
    return {"stage": shape.stage, "height": shape.height, "width": shape.width, "channels": shape.channels,
            "heads": shape.heads, "head_dim": shape.head_dim, "length": shape.length, "batch": args.batch,
            "window_size": N, "groups": GROUPS, "io_bytes": io_bytes, "rows": results,
            "skipped_backends": skipped, "index_check": index_check}


def bench_index_check(name: str, inp: Inputs, timer: Timer) -> dict:
    """Forward with check_index=True vs False on backend `name`, and the check alone."""
    q, k, v = (t.detach() for t in inp.qkv.unbind(2))

    def run(check):
        return lambda: ops.window_attention(q, k, v, inp.index, N, backend=name, check_index=check)
    with torch.no_grad():
        on, off = map(measure.summarize, timer.interleaved([run(True), run(False)]))
        alone = None
        if hasattr(ops, "_check_index"):
            alone = measure.summarize(timer(lambda: ops._check_index(inp.index)))
    return {"backend": name, "fwd_checked_ms": on, "fwd_unchecked_ms": off,
            "extra_ms": on["median"] - off["median"],
            "extra_fraction": measure.ratio(on["median"] - off["median"], off["median"]),
            "check_alone_ms": alone}


# ---------------------------------------------------------------- output

def _fmt(x, spec=".2f", none="-"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return none
    return format(x, spec)


def format_table(report: dict) -> str:
    gpu = report["device"]["kind"] == "cuda"
    head = ["stage", "backend", "fwd ms", "±IQR", "f+b ms", "x torch f", "x torch f+b", "x paper f",
            "/sdpa-w f", "saved MB"]
    if gpu:
        head += ["peak MB", "%copyBW"]
    lines = []
    for s in report["shapes"]:
        for r in s["rows"]:
            cells = [f"{s['stage']} ({s['height']}x{s['width']})", r["name"]]
            if r["status"] != "ok":
                cells += ["FAILED"] + [""] * (len(head) - 3)
            else:
                cells += [_fmt(r["fwd_ms"]["median"], ".3f"), _fmt(r["fwd_ms"]["iqr"], ".3f"),
                          _fmt(r["fwdbwd_ms"]["median"], ".3f"),
                          _fmt(r["speedup_vs_torch_fwd"]), _fmt(r["speedup_vs_torch_fwdbwd"]),
                          _fmt(r["speedup_vs_paper_fwd"]), _fmt(r["ratio_to_sdpa_windows_fwd"]),
                          _fmt(r["saved_bytes"] / 2 ** 20, ".1f")]
                if gpu:
                    cells += [_fmt(r.get("peak_fwdbwd", {}).get("peak_above_start_bytes", float("nan")) / 2 ** 20, ".1f"),
                              _fmt(100 * r.get("copy_bw_fraction_fwd", float("nan")), ".1f")]
            lines.append(cells)
        lines.append(None)
    widths = [max(len(h), *(len(c[i]) for c in lines if c)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("-" * len(out[0]))
    shapes = iter(report["shapes"])
    for cells in lines:
        if cells is None:
            s = next(shapes)
            notes = []
            ic = s["index_check"]
            if ic:
                base = ic["fwd_unchecked_ms"]["median"]
                alone = (f"the check alone {ic['check_alone_ms']['median']:.3f} ms "
                         f"({_fmt(100 * ic['check_alone_ms']['median'] / base, '.1f')}% of the {base:.3f} ms forward); "
                         if ic["check_alone_ms"] else "")
                notes.append(f"index check on {ic['backend']}: {alone}forward with check_index=True vs False: "
                             f"{ic['extra_ms']:+.3f} ms (difference of medians)")
            for r in s["rows"]:
                if r["status"] != "ok":
                    notes.append(f"{r['name']} FAILED (not timed, no speedups): {r['check']['detail']}")
            for name, why in s["skipped_backends"].items():
                notes.append(f"{name} not run: {why}")
            out += ["    " + n for n in notes]
            out.append("")
            continue
        out.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(out).rstrip() + "\n"


def write_plot(report: dict, path: Path) -> Optional[str]:
    """Bar chart of the speedups over `torch` (forward and forward+backward) per stage and
    row; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        return "matplotlib is not installed: no plot written"
    names = []
    for s in report["shapes"]:
        for r in s["rows"]:
            if r["status"] == "ok" and r["name"] not in names:
                names.append(r["name"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    stages = [s["stage"] for s in report["shapes"]]
    width = 0.8 / max(len(names), 1)
    for ax, key, title in ((axes[0], "speedup_vs_torch_fwd", "forward"),
                           (axes[1], "speedup_vs_torch_fwdbwd", "forward + backward")):
        for j, name in enumerate(names):
            values = []
            for s in report["shapes"]:
                row = next((r for r in s["rows"] if r["name"] == name and r["status"] == "ok"), None)
                values.append(row[key] if row and row.get(key) is not None else float("nan"))
            bars = ax.bar([i + j * width for i in range(len(stages))], values, width, label=name)
            ax.bar_label(bars, labels=[_fmt(v, ".2g", "") for v in values], fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(stages))])
        ax.set_xticklabels([f"stage {s['stage']}\n{s['height']}x{s['width']} D{s['head_dim']}" for s in report["shapes"]])
        ax.set_ylabel("speedup over torch (higher is better)")
        ax.set_title(title)
        ax.set_yscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=max(len(names), 1), fontsize=8, frameon=False)
    a = report["args"]
    fig.suptitle(f"window attention, {report['device']['name']}, {a['dtype']}, batch {a['batch']}, "
                 f"RSIR-{'T' if a['model'] == 'tiny' else 'B'}, N={N}, G={GROUPS}", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def output_stem(device: torch.device, dtype: torch.dtype, model: str) -> str:
    return f"bench_attn_{device.type}_{str(dtype).replace('torch.', '')}" + ("" if model == "tiny" else f"_{model}")


# ---------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32/bfloat16/float16/float64 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 8 on CPU (2 with --quick)")
    p.add_argument("--model", choices=("tiny", "base"), default="tiny", help="RSIR-T or RSIR-B stage shapes")
    p.add_argument("--image", type=int, default=224, help="image side (default 224)")
    p.add_argument("--stages", default=None, help="comma list of stages 1-4 (default all; --quick: 1,4)")
    p.add_argument("--backends", default=None,
                   help="comma list of rsir_kernels backends (default: every available one that can run the inputs)")
    p.add_argument("--quick", action="store_true", help="a few seconds in all: small batch, stages 1 and 4, few repeats")
    p.add_argument("--repeats", type=int, default=None, help="maximum timed repeats per measurement")
    p.add_argument("--budget", type=float, default=None, help="seconds per measurement after the minimum repeats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads on CPU (default: torch's; 1 is steadier on a shared machine)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and PNG (default benchmarks/results)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    gpu = args.device.type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.dtype not in DTYPES:
        p.error(f"--dtype must be one of {', '.join(DTYPES)}")
    if args.batch is None:
        args.batch = 2 if args.quick else (64 if gpu else 8)
    if args.stages is None:
        args.stages = "1,4" if args.quick else "1,2,3,4"
    try:
        args.stages = sorted({int(s) for s in args.stages.split(",") if s.strip()})
    except ValueError:
        p.error("--stages must be a comma list of integers 1..4")
    if not args.stages or any(s < 1 or s > 4 for s in args.stages):
        p.error("--stages must be a comma list of integers 1..4")
    args.backends = None if args.backends is None else [b.strip() for b in args.backends.split(",") if b.strip()]
    return args


def timing_policy(args) -> TimingPolicy:
    gpu = args.device.type == "cuda"
    if args.quick:
        policy = TimingPolicy(warmup=1, min_reps=3, max_reps=10, budget_s=0.05)
    elif gpu:
        policy = TimingPolicy(warmup=5, min_reps=10, max_reps=200, budget_s=0.3)
    else:
        policy = TimingPolicy(warmup=3, min_reps=10, max_reps=100, budget_s=2.0)
    if args.repeats is not None:
        policy.max_reps = max(1, args.repeats)
        policy.min_reps = min(policy.min_reps, policy.max_reps)
    if args.budget is not None:
        policy.budget_s = args.budget
    return policy


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    args.dtype = str(dtype).replace("torch.", "")
    torch.manual_seed(args.seed)
    policy = timing_policy(args)
    timer = Timer(device, policy)
    shapes = [s for s in stage_shapes(args.model, args.image) if s.stage in args.stages]
    for s in shapes:
        if s.height % WINDOW or s.width % WINDOW:
            raise SystemExit(f"stage {s.stage}: {s.height}x{s.width} is not divisible by {WINDOW} "
                             "(the paper baseline needs Swin's window_partition)")
    report = environment(device)
    report.update(benchmark="bench_attn",
                  args={k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()},
                  timing={"policy": dataclasses.asdict(policy),
                          "method": "CUDA events per call after an L2 flush" if device.type == "cuda"
                          else "time.perf_counter per call",
                          "order": "the rows of a stage round-robin (one call each per round), forward "
                                   "then forward+backward; warm-up calls first",
                          "forward": "under torch.no_grad()",
                          "forward_backward": "forward + torch.autograd.grad w.r.t. the leaves with a fixed dout"},
                  definitions={
                      "saved_bytes": "sum of untyped_storage().nbytes() over the unique storages of the tensors "
                                     "autograd saves for backward (saved_tensors_hooks); views of one storage count once",
                      "saved_bytes_excluding_inputs": "the same without the leaves' storages (packed qkv, or the "
                                                      "gathered windows for sdpa-windows)",
                      "io_bytes": "q, k, v read once + out written once: 4 * B * L * H * D * element size",
                      "copy_bw_fraction_fwd": "(io_bytes / forward median) / device-to-device copy bandwidth",
                      "speedup_vs_X": "median time of X / median time of the row (higher is better)",
                      "ratio_to_sdpa_windows": "median time of the row / median time of sdpa-windows "
                                               "(1.0 = as fast as attention on pre-gathered windows)"})
    t_start = time.perf_counter()
    print(f"bench_attn: {report['device']['name']} ({device}), {args.dtype}, batch {args.batch}, "
          f"RSIR-{'T' if args.model == 'tiny' else 'B'} stages {','.join(map(str, args.stages))}, "
          f"torch {torch.__version__}, commit {report['git']['commit'][:12]}", flush=True)
    copy = copy_bandwidth(device, timer)
    report["copy_bandwidth"] = copy
    if copy:
        print(f"device-to-device copy: {copy['bytes_per_s'] / 1e9:.0f} GB/s (read + write)", flush=True)
    copy_bw = copy["bytes_per_s"] if copy else None
    # steps per shape: a check per row, the forward timing, the fwd+bwd timing, the index check
    n_rows = [len(select_backends(args.backends, torch.empty(1, s.length, s.heads, s.head_dim, device=device,
                                                             dtype=dtype))[0]) + len(BASELINES) for s in shapes]
    progress = Progress(sum(n + 3 for n in n_rows), enabled=not args.no_progress)
    report["shapes"] = []
    try:
        for s in shapes:
            report["shapes"].append(bench_shape(s, args, device, dtype, timer, progress, copy_bw))
    finally:
        progress.close()
    report["elapsed_s"] = time.perf_counter() - t_start
    report["host"]["load_average_end"] = load_average()
    failed = [(s["stage"], r["name"]) for s in report["shapes"] for r in s["rows"] if r["status"] != "ok"]
    report["all_checks_passed"] = not failed

    report["table"] = format_table(report)
    print()
    print(report["table"])
    load = report["host"]["load_average_end"]
    if device.type == "cpu" and load and os.cpu_count() and load[0] > os.cpu_count() + 0.5:
        print(f"note: load average {load[0]:.1f} on {os.cpu_count()} cores at the end: other processes "
              "shared the CPU, CPU timings are noisy (compare ratios, re-run on an idle machine)")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(device, dtype, args.model)
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    note = write_plot(report, out_dir / f"{stem}.png")
    print(f"wrote {json_path}" + (f"; {note}" if note else f" and {out_dir / (stem + '.png')}")
          + f" ({report['elapsed_s']:.1f} s)")
    if failed:
        print("FAILED checks: " + ", ".join(f"stage {s} {n}" for s, n in failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
