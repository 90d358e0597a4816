"""Bytes autograd keeps for backward per call of window_attention_qkvpacked, per backend,
against qkv + index (the inputs the backward reads), counted by storage with
torch.autograd.graph.saved_tensors_hooks.

    python -m benchmarks.tools.saved_bytes
"""
import torch

import rsir_kernels as rk
from benchmarks.common.measure import saved_bytes
from rsir_kernels import backends


def main():
    batch, height, width, heads, dim, window = 2, 14, 14, 4, 8, 7
    qkv = torch.randn(batch, height * width, 3, heads, dim, requires_grad=True)
    index = rk.rs_index(batch, height, width, window, groups=2)
    inputs = qkv.nbytes + index.nbytes
    print(f"qkv {tuple(qkv.shape)} fp32 + index {tuple(index.shape)} int64 = {inputs} bytes")
    for name in backends.names():
        if backends.get(name).unavailable or backends.get(name).cannot_run(qkv[:, :, 0], window ** 2):
            continue
        kept, _ = saved_bytes(rk.window_attention_qkvpacked, qkv, index, window ** 2, backend=name,
                              check_index=False)
        print(f"{name:10s} saved {kept} bytes = qkv + index + {kept - inputs}")


if __name__ == "__main__":
    main()
