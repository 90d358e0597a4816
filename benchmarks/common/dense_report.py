"""bench_dense.py's report: the paper's FLOPs, the definitions written into the JSON, the time
ratios between rows of one run, and the printed table."""
from __future__ import annotations

from .measure import ratio

# Tables 1 and 6 of the paper, "G FLOPs" = multiply-adds (Swin's convention), whole models.
PAPER_MACS = {
    (800, 1280): {"rsir_tiny": 279e9, "swin": 264e9,
                  "what": "Table 1: whole Mask R-CNN (backbone, FPN, RPN, RoI box and mask heads)"},
    (512, 2048): {"rsir_tiny": 956e9, "swin": 945e9,
                  "what": "Table 6: whole UperNet (backbone, PPM + FPN decoder, auxiliary FCN head)"}}

DEFINITIONS = {
    "forward_ms": "eval(), no_grad, batch 1: median (min, max) of the timed rounds, rows interleaved",
    "forward_backward_ms": "train(), loss = sum of the output maps' means (FPN's, or a body row's "
                           "stage maps'), backward; no optimizer step",
    "row": "swin (timm's Swin-T) or an rsir_tiny backend, each + FPN; '<row> body': the body "
           "alone (backbone + its output LayerNorms), without the FPN",
    "train_peak": "peak bytes of one forward+backward above those held before it (CPU: resident "
                  "high-water mark, every page touched; CUDA: max_memory_allocated)",
    "profile_*": "one profiled call (the warm-up): attention ops' time / all ops' self time; RSIR: "
                 "the backend's forward and backward ops (inclusive time); Swin: SDPA's kernels, or its math path's bmm and softmax (self time)",
    "time_ratio_to_X": "this row's median / row X's median (a body row: / 'X body'), same run (below 1: "
                       "this row is faster)",
    "flops": "torch.utils.flop_counter.FlopCounterMode, forward, batch 1; macs = flops / 2; body = "
             "backbone + its output LayerNorms (counted 0), fpn = torchvision FPN (+ max-pool level)"}


def add_ratios(rows: list) -> None:
    """Each rsir row against swin and reference of the same part (a body row against the body
    rows)."""
    by = {r["row"]: r for r in rows}
    for r in rows:
        base, _, part = r["row"].partition(" ")
        if base == "swin":
            continue
        for other in (" ".join(filter(None, (o, part))) for o in ("swin", "reference")):
            if other == r["row"] or other not in by:
                continue
            other_base = other.split(" ")[0]
            for key in ("forward_ms", "forward_backward_ms"):
                r[f"time_ratio_to_{other_base}_{key[:-3]}"] = ratio(r[key]["median"], by[other][key]["median"])


def _f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def format_dense_table(report: dict) -> str:
    lines = []
    head = (f"{'size':<10} {'row':<12} {'fwd ms':>9} {'f+b ms':>9} {'peak MB':>8} {'attn% f':>7} {'attn% f+b':>9} "
            f"{'/swin f':>7} {'/swin f+b':>9} {'/ref f':>6} {'/ref f+b':>8}")
    lines += [head, "-" * len(head)]
    for s in report["sizes"]:
        for r in s["rows"]:
            peak = r["train_peak"]["peak_above_start_bytes"] / 2 ** 20 if r.get("train_peak") else None
            lines.append(
                f"{s['height']}x{s['width']:<6} {r['row']:<12} {r['forward_ms']['median']:9.0f} "
                f"{r['forward_backward_ms']['median']:9.0f} {_f(peak, '.0f'):>8} "
                f"{_f(100 * r['profile_forward']['attention_share'], '.1f'):>7} "
                f"{_f(100 * r['profile_forward_backward']['attention_share'], '.1f'):>9} "
                f"{_f(r.get('time_ratio_to_swin_forward')):>7} {_f(r.get('time_ratio_to_swin_forward_backward')):>9} "
                f"{_f(r.get('time_ratio_to_reference_forward')):>6} "
                f"{_f(r.get('time_ratio_to_reference_forward_backward')):>8}")
    lines += ["", f"{'FLOPs at':<10} {'model':<10} {'GMACs':>8} {'body':>8} {'FPN':>7} {'attn':>6} {'paper':>7}  paper counts"]
    for f in report["flops"]:
        paper = f["paper_macs"] or {}
        for name, c in f["counts"].items():
            key = "swin" if name == "swin" else "rsir_tiny"
            lines.append(f"{f['height']}x{f['width']:<6} {key:<10} {c['macs'] / 1e9:8.1f} {c['body_macs'] / 1e9:8.1f} "
                         f"{c['fpn_macs'] / 1e9:7.1f} {c['attention_macs'] / 1e9:6.1f} "
                         f"{_f(paper.get(key) / 1e9 if paper.get(key) else None, '.0f'):>7}  {paper.get('what', '')}")
    for name, why in report.get("skipped_backends", {}).items():
        lines.append(f"    {name} not run: {why}")
    return "\n".join(lines)
