"""What bench_dense.py measures per row besides times: peak memory of a training step, the
attention ops' share of the profiled time, and FLOPs with torch's FlopCounterMode."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

# glibc raises its mmap threshold after large frees (up to 32 MiB), and then keeps freed heap
# pages resident: the resident high-water mark of a later step would miss memory it reused.
# bench_dense.py re-executes itself with a fixed threshold, so every tensor above 64 KiB is
# mmapped and returned on free (resident memory follows the live tensors).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_peak_available() -> bool:
    return os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)


def peak_memory(fn, device) -> Optional[dict]:
    """Peak bytes of one call of fn above those held before it. CUDA: max_memory_allocated.
    CPU (Linux): the resident set's high-water mark (VmHWM), reset through
    /proc/self/clear_refs first, minus the resident set (VmRSS) before the call: every page
    the step touched, allocator and library buffers included. None where neither exists."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"peak_above_start_bytes": torch.cuda.max_memory_allocated(device) - before,
                "method": "torch.cuda.max_memory_allocated - memory_allocated before"}
    if not rss_peak_available():
        fn()
        return None
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                       # 5: reset the peak RSS to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return {"peak_above_start_bytes": (_status_kib("VmHWM") - before) * 1024,
            "method": "VmHWM (reset via /proc/self/clear_refs) - VmRSS before, "
                      f"{'MALLOC_MMAP_THRESHOLD_=' + os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}"}


def attention_share(fn, ops: tuple, inclusive: bool, device) -> dict:
    """Profiles one call of fn: the time of the ops named in `ops` (their inclusive time, or
    their self time) over the self time of all ops (CPU time on CPU, device time on CUDA), and
    the top ops by self time (where the time goes)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    attn_key = key.replace("self_", "") if inclusive else key
    events = list(prof.key_averages())
    total = sum(getattr(e, key) for e in events)
    attn = sum(getattr(e, attn_key) for e in events if e.key in ops)
    top = sorted((e for e in events if getattr(e, key) > 0), key=lambda e: -getattr(e, key))[:15]
    return {"clock": key, "attention_clock": attn_key, "attention_ops": list(ops),
            "total_ms": total / 1e3, "attention_ms": attn / 1e3, "attention_share": attn / total if total else None,
            "top_ops": [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count,
                         "share": getattr(e, key) / total} for e in top]}


def count_flops(model, images) -> dict:
    """Forward FLOPs (torch counts a multiply-add as 2), whole model and its `body` (the
    backbone with its output norms, which FlopCounterMode counts as 0) and `fpn`."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(images)
    per_module = counter.get_flop_counts()
    total = counter.get_total_flops()
    top = type(model).__name__
    body = sum(per_module.get(f"{top}.body", {}).values())
    fpn = sum(per_module.get(f"{top}.fpn", {}).values())
    # the attention products: RSIR's ops, SDPA, and bmm, which these models use in attention only
    attention = sum(v for op, v in per_module.get("Global", {}).items()
                    if any(k in str(op) for k in ("window_attention", "scaled_dot_product", "bmm")))
    return {"flops": total, "macs": total / 2, "body_macs": body / 2, "fpn_macs": fpn / 2,
            "attention_macs": attention / 2}
