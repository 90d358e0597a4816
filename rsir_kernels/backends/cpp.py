"""The `cpp` backend: the ops library rsir_kernels/librsir_ops.so (csrc/, rsir_kernels/_library.py).

Ops rsir_ext::window_attention_fwd / window_attention_bwd, implemented in C++ for CPU
(fp32, fp64, fp16, bf16; any head dim and window size) and, when the extension was built
with CUDA, for CUDA (fp32, fp16, bf16; head dim <= 128, window <= 256). Their fake
implementations are here. If the extension is missing, the backend registers as
unavailable and says why and how to build it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .registry import Backend, register
from .. import _library

FORWARD_OP = "rsir_ext::window_attention_fwd"
BACKWARD_OP = "rsir_ext::window_attention_bwd"
CUDA_MAX_HEAD_DIM = 128
CUDA_MAX_WINDOW = 256
CUDA_MAX_GRID_YZ = 65535  # the CUDA grid is (windows, heads, batch): gridDim.y, .z <= 65535
_BUILD_HINT = ("build it with `python setup.py build_ext --inplace` (or `make ext`) in the source tree, "
               "or `pip install --no-build-isolation .`")

_why = _library.load()  # registers the rsir_ext ops
if _why is not None:
    _why = f"the ops library {_library.NAME} did not load ({_why}); {_BUILD_HINT}"
WITH_CUDA = _why is None and torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OP, "CUDA")
CPU_ISA = None if _why is not None else torch.ops.rsir_ext.cpu_isa()


def cannot_run(q: torch.Tensor, window_size: int) -> Optional[str]:
    """None if the compiled kernels run these inputs, else why not."""
    if q.device.type == "cpu":
        return None
    if q.device.type != "cuda":
        return f"the C++ extension has no kernels for device {q.device.type!r}"
    if not WITH_CUDA:
        return ("the C++ extension was built without CUDA (torch without CUDA or no nvcc at build time); "
                f"rebuild it with a CUDA torch and nvcc: {_BUILD_HINT}")
    if q.dtype == torch.float64:
        return "the CUDA kernels run float16, bfloat16 and float32, not float64"
    if q.shape[-1] > CUDA_MAX_HEAD_DIM:
        return f"the CUDA kernels take head dim <= {CUDA_MAX_HEAD_DIM}, got {q.shape[-1]}"
    if min(window_size, q.shape[1]) > CUDA_MAX_WINDOW:
        return f"the CUDA kernels take window_size <= {CUDA_MAX_WINDOW}, got {window_size}"
    if q.shape[0] > CUDA_MAX_GRID_YZ:
        return f"the CUDA kernels take batch <= {CUDA_MAX_GRID_YZ} (one grid dimension), got {q.shape[0]}"
    if q.shape[2] > CUDA_MAX_GRID_YZ:
        return f"the CUDA kernels take heads <= {CUDA_MAX_GRID_YZ} (one grid dimension), got {q.shape[2]}"
    return None


if _why is None:
    from .registry import register_fakes

    register_fakes(FORWARD_OP, BACKWARD_OP)

register(Backend(name="cpp", forward_op=FORWARD_OP, backward_op=BACKWARD_OP, priority={"cpu": 20, "cuda": 20},
                 unavailable=_why, cannot_run=cannot_run))
