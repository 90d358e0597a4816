"""A few forward+backward calls of the `cpp` backend's CUDA kernels (and Triton's) at shapes
that cover their code paths, without a reference: the program compute-sanitizer runs
(racecheck, memcheck), where the reference itself would take most of the time.

    compute-sanitizer --tool racecheck --error-exitcode 99 python3 scripts/cuda_smoke.py [cpp|triton]
"""
import sys

import torch

import rsir_kernels as rk

# (B, L, H, D, G, N, dtype): window 49 as RSIR-T, tiny windows, D 24 and 128, window 256, partial windows
SHAPES = [(2, 98, 4, 32, 2, 49, torch.bfloat16), (1, 40, 2, 24, 1, 7, torch.float32),
          (1, 300, 2, 128, 2, 256, torch.float16), (1, 100, 2, 16, 1, 49, torch.float32),
          (1, 64, 2, 80, 1, 64, torch.bfloat16)]


def main(backend: str) -> int:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for batch, length, heads, dim, groups, n, dtype in SHAPES:
        qkv = torch.randn(batch, length, 3, heads, dim, device="cuda", dtype=dtype, generator=gen)
        qkv.requires_grad_()
        index = torch.stack([torch.randperm(length, device="cuda", generator=gen) for _ in range(batch * groups)])
        index = index.view(batch, groups, length)
        out = rk.window_attention(*qkv.unbind(2), index, n, backend=backend)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and torch.isfinite(qkv.grad).all()
    print(f"cuda_smoke {backend}: {len(SHAPES)} shapes ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cpp"))
