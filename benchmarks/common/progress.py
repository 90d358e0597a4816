"""Progress of a benchmark run on stderr: tqdm when it is installed, else plain lines."""
from __future__ import annotations

import sys


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
