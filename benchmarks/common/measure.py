"""Small, pure measuring helpers shared by the benchmarks (and unit-tested in tests/test_bench.py).

- saved_bytes / SavedTensorsCounter: bytes autograd keeps for backward.
  Definition: the sum of untyped_storage().nbytes() over the *unique* storages of every
  tensor packed by torch.autograd.graph.saved_tensors_hooks during the forward. Views of
  one storage (q, k, v as views of a packed qkv, a tensor saved twice) count once; a view
  counts its whole storage, since that storage stays alive as long as the view does.
- attention_io_bytes / bandwidth / copy_bytes: the roofline arithmetic of docs/design.md
  section 5: a fused window attention reads q, k, v once and writes out once.
- summarize: median and spread of repeated timings.
- check_close: the project's tolerance rule (rsir_kernels.reference.tolerance_failure,
  docs/design.md section 4), applied to one tensor.
"""
from __future__ import annotations

import math
import statistics
from typing import Iterable, Optional, Sequence

import torch

# ---------------------------------------------------------------- saved tensors


def _storage_key(t: torch.Tensor):
    """(device, data pointer) of t's storage: equal for all views of one storage."""
    storage = t.untyped_storage()
    return (str(t.device), storage.data_ptr(), storage.nbytes())


class SavedTensorsCounter:
    """Context manager: records every tensor autograd saves for backward while active.

        with SavedTensorsCounter() as c:
            y = f(x)
        c.nbytes            # unique storages, see the module docstring
        c.nbytes_excluding(x)  # the same, leaving out x's storage (e.g. the inputs)

    It keeps references to the saved tensors until the counter is dropped (pack returns the
    tensor itself, so backward still works while the counter is alive and after).
    """

    def __init__(self):
        self.storages: dict = {}   # storage key -> nbytes
        self.count = 0             # tensors packed (with repeats)
        self._alive = []           # the packed tensors: no storage is freed and its address
        #                            reused while counting, so keys never collide
        self._hooks = None

    def _pack(self, t):
        self.count += 1
        self._alive.append(t)
        try:
            key = _storage_key(t)
            self.storages[key] = key[2]
        except (RuntimeError, NotImplementedError):  # a tensor without a storage (sparse, ...)
            self.storages[("nostorage", id(t))] = t.numel() * t.element_size()
        return t

    @staticmethod
    def _unpack(t):
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def nbytes_excluding(self, *tensors: torch.Tensor) -> int:
        skip = {_storage_key(t) for t in tensors}
        return sum(n for k, n in self.storages.items() if k not in skip)


def saved_bytes(fn, *args, exclude: Sequence[torch.Tensor] = (), **kwargs) -> tuple[int, int]:
    """Runs fn(*args, **kwargs) once with grad enabled; returns (saved bytes, saved bytes
    leaving out the storages of `exclude`), both as SavedTensorsCounter defines them."""
    with torch.enable_grad(), SavedTensorsCounter() as counter:
        out = fn(*args, **kwargs)
    del out
    return counter.nbytes, counter.nbytes_excluding(*exclude)


# ---------------------------------------------------------------- bandwidth


def attention_io_bytes(batch: int, length: int, heads: int, dim: int, element_size: int) -> int:
    """Bytes a fused window attention must move at least: q, k, v read once + out written
    once, each (B, L, H, D). (The index, B*G*L integers, is left out: it is small.)"""
    return 4 * batch * length * heads * dim * element_size


def copy_bytes(nbytes: int) -> int:
    """Bytes a device-to-device copy of an nbytes tensor moves: read once + write once."""
    return 2 * nbytes


def bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes per second; NaN when the time is not positive."""
    return nbytes / seconds if seconds > 0 else float("nan")


def bandwidth_fraction(nbytes: int, seconds: float, reference_bytes_per_s: float) -> float:
    """Achieved bandwidth (nbytes / seconds) as a fraction of a reference bandwidth."""
    if not reference_bytes_per_s or reference_bytes_per_s != reference_bytes_per_s:
        return float("nan")
    return bandwidth(nbytes, seconds) / reference_bytes_per_s


# ---------------------------------------------------------------- timing statistics


def summarize(times_s: Iterable[float]) -> dict:
    """Seconds per repeat -> {median, q1, q3, iqr, min, max, n} in milliseconds (n: repeats).
    Quartiles by the 'inclusive' method (exact on the samples for n >= 2)."""
    ms = sorted(t * 1e3 for t in times_s)
    if not ms:
        raise ValueError("no timings")
    if len(ms) == 1:
        q1 = q3 = ms[0]
    else:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    return {"median": statistics.median(ms), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": ms[0], "max": ms[-1], "n": len(ms)}


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    if isinstance(numerator, float) and math.isnan(numerator):
        return None
    return numerator / denominator


# ---------------------------------------------------------------- correctness

LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_close(actual: torch.Tensor, exact: torch.Tensor,
                low_precision: Optional[torch.Tensor] = None) -> tuple[bool, str]:
    """actual vs the float64 `exact` -> (passed, detail), by the project's one tolerance rule
    (rsir_kernels.reference.tolerance_failure: fp32 1e-5 and fp64 1e-10 relative; fp16/bf16
    within 2x the same-precision reference's error, `low_precision`, plus 1e-3), Inf failing too."""
    from rsir_kernels.reference import tolerance_failure
    if tuple(actual.shape) == tuple(exact.shape) and not torch.isfinite(actual).all():
        return False, "NaN/Inf in output"
    why = tolerance_failure(actual, exact, low_precision)
    return why is None, why or "within the rule"
