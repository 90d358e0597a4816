"""Measurement of one stage of bench_attn.py: check, saved bytes, peak memory, interleaved
forward and forward+backward timing of every row (eager, and device time where there is a
device), speedups, and the cost of check_index."""
from __future__ import annotations

from typing import Optional

import torch

from . import measure
from .cases import GROUPS, N, Inputs, Shape, backend_row, baseline_rows, make_inputs, select_backends
from .checks import check_row, exact_reference
from .progress import Progress
from rsir_kernels import ops
from .timing import DeviceTimer, Timer, forward_backward_fn, forward_fn, peak_memory


def bench_shape(shape: Shape, args, device, dtype, timer: Timer, progress: Progress,
                copy_bw: Optional[float], device_timer: Optional[DeviceTimer] = None) -> dict:
    """Checks, then times every row of one stage: eager forward and forward+backward
    (interleaved), then, where there is a device clock, their device times (CUDA-graph
    replays, interleaved); speedups against the baselines from each; the index check's cost.
    Progress: one step per row, four for the timings, one for the index check."""
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
    # Device time of the same calls (CUDA-graph replays): kernel against kernel, without the
    # host time that bounds the eager figures of small stages. None on CPU.
    for key, make in (("device_fwd_ms", forward_fn), ("device_fwdbwd_ms", forward_backward_fn)):
        measured = device_timer.interleaved([make(row) for row, _ in timed]) \
            if device_timer is not None and timed else None
        for i, (_, r) in enumerate(timed):
            result = measured[i] if measured is not None else None
            r[key] = measure.summarize(result) if isinstance(result, list) else None
            if isinstance(result, str):
                r[key + "_error"] = result
        progress.step(f"stage {shape.stage} {key[:-3]}" + ("" if measured is not None else " (n/a)"))
    for _, r in timed:
        r["bytes_per_s_fwd"] = measure.bandwidth(io_bytes, r["fwd_ms"]["median"] / 1e3)
        if copy_bw:
            r["copy_bw_fraction_fwd"] = measure.bandwidth_fraction(io_bytes, r["fwd_ms"]["median"] / 1e3, copy_bw)

    by_name = {r["name"]: r for r in results if r["status"] == "ok"}

    for r in results:
        if r["status"] == "ok":
            r.update(speedups(r, by_name))

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


def median(row: Optional[dict], key: str) -> Optional[float]:
    """The median of row[key] (a measure.summarize dict), None when the row or the timing is missing."""
    stats = row.get(key) if row else None
    return stats["median"] if stats else None


def speedups(r: dict, by_name: dict) -> dict:
    """A row's ratios against the baselines of its stage (rows by name), from the eager times
    (speedup_vs_torch_fwd, ...) and from the device times (device_speedup_vs_torch_fwd, ...);
    None where a time is missing."""
    out = {}
    for prefix in ("", "device_"):
        for short in ("fwd", "fwdbwd"):
            key = f"{prefix}{short}_ms"
            mine = median(r, key)
            out[f"{prefix}speedup_vs_torch_{short}"] = measure.ratio(median(by_name.get("torch"), key), mine)
            out[f"{prefix}speedup_vs_paper_{short}"] = measure.ratio(median(by_name.get("paper"), key), mine)
            out[f"{prefix}ratio_to_sdpa_windows_{short}"] = measure.ratio(mine, median(by_name.get("sdpa-windows"), key))
    return out


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
