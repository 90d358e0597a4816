"""Writing the results of bench_attn.py and bench_model.py: the JSON field notes, the printed
tables, the JSON file and the plot of the speedups."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from .cases import GROUPS, N

# ---------------------------------------------------------------- notes written into the JSON

ATTN_TIMING_NOTES = {
    "order": "the rows of a stage round-robin (one call each per round), forward "
             "then forward+backward; warm-up calls first",
    "forward": "under torch.no_grad()",
    "forward_backward": "forward + torch.autograd.grad w.r.t. the leaves with a fixed dout"}

ATTN_DEFINITIONS = {
    "saved_bytes": "sum of untyped_storage().nbytes() over the unique storages of the tensors "
                   "autograd saves for backward (saved_tensors_hooks); views of one storage count once",
    "saved_bytes_excluding_inputs": "the same without the leaves' storages (packed qkv, or the "
                                    "gathered windows for sdpa-windows)",
    "io_bytes": "q, k, v read once + out written once: 4 * B * L * H * D * element size",
    "copy_bw_fraction_fwd": "(io_bytes / forward median) / device-to-device copy bandwidth",
    "speedup_vs_X": "median time of X / median time of the row (higher is better)",
    "device_fwd_ms / device_fwdbwd_ms": "device time of one call: CUDA-graph replays between CUDA events "
                                        "(null on CPU, or with device_*_error when the call could not be captured)",
    "device_speedup_vs_X": "the same ratios from the device times (kernel against kernel)",
    "ratio_to_sdpa_windows": "median time of the row / median time of sdpa-windows "
                             "(1.0 = as fast as attention on pre-gathered windows)"}

MODEL_DEFINITIONS = {"saved_bytes_per_image": "unique storages saved for backward in one training "
                                              "forward (incl. loss), leaving out the parameters and the "
                                              "images, / batch (under autocast the low-precision copies "
                                              "of the weights count)",
                     "saved_bytes_total": "the same with parameters and images, for the whole batch",
                     "train_step": "forward + cross-entropy + backward + AdamW step + zero_grad",
                     "infer": "forward under inference_mode, eval()",
                     "speedup_vs_reference": "reference median / backend median, same mode",
                     "speedup_vs_best_reference": "the fastest reference training step of any mode / backend median",
                     "mode": "eager; compile: torch.compile(model); reduce-overhead: torch.compile(model, "
                             "mode='reduce-overhead') (CUDA graphs); compiled modes time the training step only",
                     "compile_s": "the first compiled training step, compilation included",
                     "logits_rel_err_vs_eager": "compiled rows: ||compiled - eager|| / ||eager|| of the first "
                                                "step's logits, same weights and RS-Win draws"}


def args_record(args) -> dict:
    """The parsed arguments as written into the JSON (devices as strings)."""
    return {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}


def write_json(report: dict, path: Path) -> Path:
    path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    return path


# ---------------------------------------------------------------- bench_attn

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
    device = any(r.get("device_fwd_ms") or r.get("device_fwd_ms_error") for s in report["shapes"] for r in s["rows"])
    if device:
        head += ["dev f ms", "dev f+b ms", "dev x torch f", "dev x torch f+b", "dev /sdpa-w f"]
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
                if device:
                    dev = [r.get("device_fwd_ms"), r.get("device_fwdbwd_ms")]
                    cells += [_fmt(d["median"] if d else None, ".3f", "n/a") for d in dev]
                    cells += [_fmt(r.get(k), ".2f", "n/a") for k in ("device_speedup_vs_torch_fwd",
                                                                     "device_speedup_vs_torch_fwdbwd",
                                                                     "device_ratio_to_sdpa_windows_fwd")]
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
                for key in ("device_fwd_ms_error", "device_fwdbwd_ms_error"):
                    if r.get(key):
                        notes.append(f"{r['name']} {key[:-9].replace('_', ' ')}: {r[key]}")
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



# ---------------------------------------------------------------- bench_model

def model_output_stem(device: torch.device, dtype_name: str, model: str) -> str:
    return f"bench_model_{device.type}_{dtype_name}" + ("" if model == "tiny" else f"_{model}")


def format_model_table(rows: list, skipped: dict, gpu: bool) -> str:
    """The table bench_model.py prints (a blank line first, no trailing newline): one line per
    (backend, mode); compiled modes time the training step only."""
    head = f"{'backend':<10} {'mode':<15} {'train ms':>9} {'img/s':>8} {'x ref':>6} {'x best ref':>10} " \
           f"{'infer ms':>9} {'img/s':>8} {'x ref':>6} {'saved MB/img':>12}" + (f" {'peak MB':>8}" if gpu else "") + "  check"
    lines = ["", head, "-" * len(head)]
    for r in rows:
        mode = r.get("mode", "eager")
        if "train_step_ms" not in r:
            why = r.get("error") or (f"logits rel err vs eager {r['logits_rel_err_vs_eager']:.1e}"
                                     if "logits_rel_err_vs_eager" in r else "")
            lines.append(f"{r['backend']:<10} {mode:<15} FAILED: {why}")
            continue
        line = (f"{r['backend']:<10} {mode:<15} {r['train_step_ms']['median']:9.1f} {r['train_images_per_s']:8.1f} "
                f"{_fmt(r.get('train_speedup_vs_reference')):>6} {_fmt(r.get('train_speedup_vs_best_reference')):>10} ")
        if "infer_ms" in r:
            line += (f"{r['infer_ms']['median']:9.1f} {r['infer_images_per_s']:8.1f} "
                     f"{_fmt(r.get('infer_speedup_vs_reference')):>6} {r['saved_bytes_per_image'] / 2 ** 20:12.1f}")
        else:
            line += f"{'-':>9} {'-':>8} {'-':>6} {'-':>12}"
        if gpu:
            peak = r.get("train_peak_above_start_bytes")
            line += f" {_fmt(peak / 2 ** 20 if peak else None, '.0f'):>8}"
        if "logits_rel_err_vs_reference" in r:
            line += f"  {'ok' if r['check_passed'] else 'FAILED'} (logits rel err {r['logits_rel_err_vs_reference']:.1e})"
        else:
            line += (f"  {'ok' if r['check_passed'] else 'FAILED'} (vs eager {r['logits_rel_err_vs_eager']:.1e}; "
                     f"first step {r['compile_s']:.0f} s)")
        lines.append(line)
    for name, why in skipped.items():
        lines.append(f"    {name} not run: {why}")
    return "\n".join(lines)
