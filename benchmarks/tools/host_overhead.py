"""The Python (host) time of one call of the triton backend, with the kernel launches stubbed
out, on CPU tensors: what the glue around the kernels costs, measurable without a GPU.

    python -m benchmarks.tools.host_overhead [--calls 500]

Prints the best of 5 rounds of `--calls` calls, in microseconds per call, of a packed forward
(no grad) and a packed forward+backward (autograd.grad) of a tiny shape (B=1, L=49, H=2, D=16,
G=2, N=49), through rk.window_attention_qkvpacked(..., check_index=False) as RSIRAttention calls
it. Runs under TRITON_INTERPRET=1 (set here); the two Triton kernels are replaced by stubs.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the backend runs on CPU tensors

import torch  # noqa: E402

import rsir_kernels as rk  # noqa: E402
from rsir_kernels.backends.triton import launch  # noqa: E402

from ..common.timing import per_call_us  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    launch.window_attn_fwd_kernel = _NoLaunch()
    launch.window_attn_bwd_kernel = _NoLaunch()
    batch, length, heads, dim, groups, window = 1, 49, 2, 16, 2, 49
    qkv = torch.randn(batch, length, 3, heads, dim, requires_grad=True)
    index = torch.stack([torch.randperm(length) for _ in range(batch * groups)]).view(batch, groups, length)
    dout = torch.randn(batch, length, heads, dim)

    def forward():
        with torch.no_grad():
            return rk.window_attention_qkvpacked(qkv, index, window, backend="triton", check_index=False)

    def forward_backward():
        out = rk.window_attention_qkvpacked(qkv, index, window, backend="triton", check_index=False)
        return torch.autograd.grad(out, (qkv,), dout)

    print(f"host time per call, triton backend, launches stubbed (torch {torch.__version__}): "
          f"forward {per_call_us(forward, args.calls):.1f} us, "
          f"forward+backward {per_call_us(forward_backward, args.calls):.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
