"""Preemption: SIGTERM (what torchrun and schedulers send before killing) and SIGUSR1 (what SLURM
sends ahead of time with --signal) only set a flag; the training loop agrees on it over the
ranks at its next step, saves that exact position and ends with Preempted (exit status 75)."""
from __future__ import annotations

import functools
import multiprocessing
import signal
import threading
import time

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
WORKER_GRACE_S = 2.0  # how long a loader worker waits to learn whether its SIGTERM was the job's
_stopping = None  # a byte shared with loader workers: 1 once the trainer got a stop signal


class StopRequest:
    """Holds the first stop signal received while installed (a context manager). Handlers can
    only be set from the main thread: elsewhere (a caller's thread) signals keep their handlers
    and the flag stays unset."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
        if _stopping is not None:
            _stopping.value = 1

    def __enter__(self) -> "StopRequest":
        if _stopping is not None:
            _stopping.value = 0
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if _stopping is not None:
            _stopping.value = 0


def worker_init_fn():
    """A DataLoader worker_init_fn. A scheduler signals every process of the job, loader workers
    included (SLURM), and they must outlive the step the trainer finishes: SIGUSR1 is ignored;
    a SIGTERM is ignored when the trainer got one too (the job's stop), and ends the worker
    otherwise (how multiprocessing ends leftover workers at exit)."""
    global _stopping
    if _stopping is None:  # created before the workers start, so forked and spawned ones share it
        _stopping = multiprocessing.RawValue("b", 0)
    return functools.partial(_in_worker, _stopping)


def _in_worker(stopping, worker_id: int) -> None:
    def on_sigterm(signum, frame):
        deadline = time.monotonic() + WORKER_GRACE_S
        while time.monotonic() < deadline:
            if stopping.value:
                return  # the job's stop: the trainer ends this worker after its save
            time.sleep(0.01)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
