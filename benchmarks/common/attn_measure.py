"""Measurement of one stage of bench_attn.py: check, saved bytes, peak memory, interleaved
forward and forward+backward timing of every row, speedups, and the cost of check_index."""
from __future__ import annotations

from typing import Optional

import torch

from . import measure
from .cases import GROUPS, N, Inputs, Shape, backend_row, baseline_rows, make_inputs, select_backends
from .checks import check_row, exact_reference
from .progress import Progress
from rsir_kernels import ops
from .timing import Timer, forward_backward_fn, forward_fn, peak_memory


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
