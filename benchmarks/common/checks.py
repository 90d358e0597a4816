"""Correctness of a row before it is timed: its output and gradients against
rsir_kernels.reference (docs/design.md section 4)."""
from __future__ import annotations

import torch

from . import measure
from .cases import N, Inputs, Row
from rsir_kernels import reference


def exact_reference(inp: Inputs, dtype, upcast=True):
    """(out, dqkv) of rsir_kernels.reference on the benchmark inputs, computed in dtype."""
    leaf = inp.qkv.detach().to(dtype).requires_grad_()
    out = reference.window_attention_reference(*leaf.unbind(2), inp.index, N, upcast=upcast)
    (dqkv,) = torch.autograd.grad(out, leaf, inp.dout.to(dtype))
    return out.detach(), dqkv


def check_row(row: Row, exact, low) -> dict:
    """Output and leaf gradients of row vs the float64 reference (docs/design.md section 4)."""
    try:
        with torch.enable_grad():
            out = row.fn(*row.leaves)
            grads = torch.autograd.grad(out, row.leaves, row.dout)
    except Exception as e:  # noqa: BLE001 - a crashing backend is reported, not fatal
        return {"passed": False, "detail": f"raised {type(e).__name__}: {e}"}
    want_out, want_grads = row.expected(*exact)
    low_out, low_grads = row.expected(*low) if low is not None else (None, [None] * len(grads))
    results = [("out", *measure.check_close(out, want_out, low_out))]
    for i, (g, w, lg) in enumerate(zip(grads, want_grads, low_grads)):
        results.append((f"grad{i}" if len(grads) > 1 else "grad", *measure.check_close(g, w, lg)))
    passed = all(ok for _, ok, _ in results)
    detail = "; ".join(f"{n}: {d}" + ("" if ok else " FAILED") for n, ok, d in results)
    return {"passed": passed, "detail": detail}
