"""Run metadata shared by bench_attn.py and bench_model.py: device name, versions, git
commit, date, host (load average) and the backends of rsir_kernels."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from rsir_kernels import ops

ROOT = Path(__file__).resolve().parent.parent


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
