"""Timing: the TimingPolicy (warm-up, repeats, time budget), the Timer (perf_counter on CPU,
CUDA events after an L2 flush on GPU), the forward / forward+backward callables of a row,
peak CUDA memory and the device-to-device copy bandwidth."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from . import measure
from .cases import Row


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
