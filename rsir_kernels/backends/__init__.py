"""The backends: each registers its forward and backward ops in the registry (registry.py),
and importing this package imports every backend (the bottom of this file).

The contract every backend keeps (docs/design.md section 1):

    forward(q, k, v, index, window_size, scale) -> (out, lse)
        q, k, v  (B, L, H, D), any strides, one dtype and device
        index    (B, G, L) int32/int64, contiguous, each row a permutation of 0..L-1;
                 an unchecked row may hold anything, and then, for its group's heads: a
                 token in no window gets out = 0 and dq = dk = dv = 0; an entry outside
                 0..L-1 is an absent slot, neither read nor written (the reference backend
                 raises torch.gather's error instead); a token in several windows gets the
                 rows of one of them
        window_size  1 <= N <= L (rsir_kernels.ops clamps a larger one to L)
        out      (B, L, H, D) contiguous, q's dtype, original token order
        lse      (B, H, L) contiguous, float32 (float64 for float64 inputs): the
                 log-sum-exp of each row's scaled scores, original token order
        (lse is what the kernels' own tests and the fuzz check against the reference; no
        backward reads it: rsir_kernels.autograd_functions marks it non-differentiable
        and saves neither it nor out)
    backward(dout, q, k, v, index, window_size, scale) -> dqkv
        dout     (B, L, H, D), any strides (kernels read it in place, like q, k, v); the
                 softmax is recomputed from the scores, so nothing of the forward is read
        dqkv     (B, L, 3, H, D) contiguous, q's dtype: dq, dk, dv packed, so that a
                 module whose q, k, v are views of one packed qkv gets its gradient
                 with no torch.cat / torch.stack

Both are torch.library ops with fake implementations (`fake_forward`, `fake_backward`, here
for every backend), each backend under op names of its own, written once as constants in its
module. The ops carry no autograd of their own: rsir_kernels.autograd_functions calls them
on every traced route (torch.compile, torch.export, torch.jit.trace, torch.func, dispatch
modes), so compiled and exported graphs hold exactly these ops. A backend whose ops are
Python functions also hands those functions over (`eager_forward`, `eager_backward`): its
`direct` kernels, which plain eager calls run without the dispatcher's round trips through
Python (host time that the small stages of a model on a GPU feel: docs/performance.md,
"Lessons that hold"). Which of `ops` and `direct` a call runs is rsir_kernels.routing's
decision.
Validation is not the backends' job: rsir_kernels.ops checks every input before any op
runs, so a backend may assume well-formed arguments.
"""
from __future__ import annotations

from .registry import (CanRun, Backend, Kernels, backward_flops, fake_backward, fake_forward,  # noqa: F401
                       forward_flops, get, names, op_packet, register, register_fakes)

# Each module registers itself on import; order does not matter (priority decides "auto").
from . import pytorch as _pytorch  # noqa: E402,F401
from . import triton as _triton  # noqa: E402,F401
from . import cpp as _cpp  # noqa: E402,F401
