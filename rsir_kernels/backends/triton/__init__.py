"""The `triton` backend: fused gather-window-attention-scatter, forward and backward.

kernels.py holds the @triton.jit kernels, config.py the limits and launch configurations,
plans.py the per-shape launch plans, launch.py the launchers (what plain eager calls run) and
custom_ops.py the torch.library ops rsir::window_attention_triton and
rsir::window_attention_triton_backward (what traced graphs hold). Runs on CUDA
tensors; on CPU tensors only when TRITON_INTERPRET=1 was set before triton was imported
(tests), and then never picked by backend="auto".
"""
from __future__ import annotations

import os

import torch

from ..registry import Backend, register
from .config import BACKWARD_OP, FORWARD_OP, NAME


def _unavailable_reason():
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable: {type(exc).__name__}: {exc}"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "no CUDA device (on CPU only under TRITON_INTERPRET=1, set before triton is imported)"
    return None


_reason = _unavailable_reason()
if _reason is None:
    from . import config, custom_ops, launch  # noqa: F401  (custom_ops registers the ops)

    register(Backend(name=NAME, forward_op=FORWARD_OP, backward_op=BACKWARD_OP, priority={"cuda": 30},
                     cannot_run=config.cannot_run, eager_forward=launch.forward,
                     eager_backward=launch.backward))
else:
    register(Backend(name=NAME, forward_op=FORWARD_OP, backward_op=BACKWARD_OP, priority={"cuda": 30},
                     unavailable=_reason))
