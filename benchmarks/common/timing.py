"""Timing: the host time of fast calls (per_call_seconds), the TimingPolicy (warm-up, repeats,
time budget), the Timer of eager calls (perf_counter on CPU, CUDA events after an L2 flush on
GPU), the DeviceTimer of device time alone (CUDA-graph replays; none on CPU), the forward /
forward+backward callables of a row, peak CUDA memory and the device-to-device copy bandwidth."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Sequence

import torch

from . import measure
from .cases import Row


@dataclasses.dataclass
class TimingPolicy:
    warmup: int = 3
    min_reps: int = 5
    max_reps: int = 50
    budget_s: float = 1.0     # stop after min_reps once this much time was spent


def cuda_event_times(fns, reps: int, flush: torch.Tensor, device) -> list[list[float]]:
    """Seconds of each call of each fn, `reps` rounds round-robin, each call between two CUDA
    events after zeroing `flush` (larger than L2, so no call finds the previous one's data)."""
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(reps)] for _ in fns]
    for r in range(reps):
        for fn, evs in zip(fns, events):
            start, end = evs[r]
            flush.zero_()
            start.record()
            fn()
            end.record()
    torch.cuda.synchronize(device)
    return [[s.elapsed_time(e) / 1e3 for s, e in evs] for evs in events]


def per_call_seconds(fns: Sequence[Callable[[], object]], calls: int, rounds: int, warmup: Optional[int] = None,
                     clock: Callable[[], float] = time.perf_counter) -> list[list[float]]:
    """For host overheads measured in microseconds, where one call is below the clock's
    resolution: for each of `fns`, the mean time of one call in each of `rounds` rounds of
    `calls` back-to-back calls, in seconds (a list of `rounds` floats per function), after
    `warmup` calls of each (default `calls`). The rounds interleave the functions (a round of
    each in turn), so a change in background load hits each alike. `clock` is time.perf_counter
    (wall time) or time.thread_time (this thread's CPU time: time spent descheduled on a loaded
    host does not count)."""
    for fn in fns:
        for _ in range(calls if warmup is None else warmup):
            fn()
    means = [[] for _ in fns]
    for _ in range(rounds):
        for fn, kept in zip(fns, means):
            start = clock()
            for _ in range(calls):
                fn()
            kept.append((clock() - start) / calls)
    return means


def per_call_us(fn, calls: int, rounds: int = 5, warmup: int = 50) -> float:
    """Best over `rounds` of the mean wall time of `calls` back-to-back calls, in microseconds."""
    return min(per_call_seconds([fn], calls, rounds, warmup)[0]) * 1e6


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
        return cuda_event_times(fns, reps, self.flush, self.device)


class CudaGraphs:
    """The CUDA side of DeviceTimer: `capture(fn)` records one call of fn in a CUDA graph and
    returns its replay; `time(replays, reps)` replays them round-robin, each between two CUDA
    events after an L2 flush, and returns seconds per replay. A replay issues the recorded
    kernels with no Python, no dispatcher and no launch overhead in between: what it measures
    is the time the device spends on one call."""

    def __init__(self, device: torch.device):
        self.device = device
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
        self.graphs = []     # kept alive until release(): each holds its own memory pool

    def capture(self, fn):
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):        # warm-up on a side stream, as torch.cuda.graph asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        self.graphs.append(graph)
        return graph.replay

    def estimate(self, replay) -> float:
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        replay()
        torch.cuda.synchronize(self.device)
        return max(time.perf_counter() - t0, 1e-6)

    def time(self, replays, reps: int) -> list[list[float]]:
        return cuda_event_times(replays, reps, self.flush, self.device)

    def release(self):
        self.graphs.clear()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()


class DeviceTimer:
    """Device time of each of several calls, without the host time around them: on CUDA each
    fn is captured in a CUDA graph (CudaGraphs) and the graphs are replayed round-robin. On a
    CPU there is no device apart from the host: `available` is False and `interleaved`
    returns None (the eager times are the only times).

    `graphs` is anything with CudaGraphs' capture / estimate / time / release (tests pass a
    stand-in). A fn that cannot be captured (a host sync inside, say) gets an error string
    instead of times; the others are still timed."""

    def __init__(self, policy: TimingPolicy, graphs=None):
        self.policy, self.graphs = policy, graphs

    @property
    def available(self) -> bool:
        return self.graphs is not None

    def interleaved(self, fns: list) -> Optional[list]:
        """[list of seconds per replay, or 'error text'] per fn; None without a device clock."""
        if self.graphs is None:
            return None
        results, replays = [], []
        for fn in fns:
            try:
                replays.append(self.graphs.capture(fn))
                results.append(None)
            except Exception as e:  # noqa: BLE001 - reported in the row, the others still run
                results.append(f"capture failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        try:
            if replays:
                p = self.policy
                per_round = sum(self.graphs.estimate(r) for r in replays)
                reps = int(min(p.max_reps, max(p.min_reps, p.budget_s * len(replays) // per_round)))
                times = iter(self.graphs.time(replays, reps))
                results = [next(times) if r is None else r for r in results]
        finally:
            self.graphs.release()
        return results


def device_timer(device: torch.device, policy: TimingPolicy) -> DeviceTimer:
    """CUDA-graph replays on a CUDA device; on a CPU a DeviceTimer that is not available."""
    return DeviceTimer(policy, CudaGraphs(device) if device.type == "cuda" else None)


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
