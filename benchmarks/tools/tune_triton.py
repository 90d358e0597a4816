"""Sweep the Triton kernels' launch configurations at the RSIR stage shapes: the measured table
that config.make_config should follow (docs/performance.md, "Open hypotheses").

    python -m benchmarks.tools.tune_triton [--model tiny] [--batch 64] [--stages 1,2,3,4]

For each stage shape (bf16, window 49, G = 2) it times the forward and the backward kernel
alone (preallocated buffers, launch.forward_into / backward_into) for every num_warps in
{2, 4, 8} and every heads-per-program that divides H/G (<= 8), after checking that config's
output and gradients against the float32 reference (max error relative to the largest value). Times are medians of CUDA-graph replays
(triton.testing.do_bench_cudagraph: kernel time, no launch overhead; inputs may sit in L2 at
the small stages, so compare configs with each other, not with bench_attn). The row marked
`*` is what make_config picks today. Dry run without a GPU:
`TRITON_INTERPRET=1 python -m benchmarks.tools.tune_triton --device cpu --batch 1 --stages 4`.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

from benchmarks.common.cases import GROUPS, N, make_inputs, stage_shapes
from benchmarks.common.cli import resolve_device


def kernel_us(fn, device) -> float:
    """Median time of fn() in microseconds: CUDA-graph replays on a GPU, perf_counter on CPU."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e6


def candidates(base, per_group: int, warps_list=(2, 4, 8), hpp_list=None):
    """base with every num_warps in warps_list and every heads-per-program dividing per_group
    (those in hpp_list only, when given)."""
    hpps = [h for h in range(1, min(per_group, 8) + 1) if per_group % h == 0] if base.single else [1]
    hpps = [h for h in hpps if hpp_list is None or h in hpp_list]
    for warps in warps_list:
        for hpp in hpps:
            yield dataclasses.replace(base, num_warps=warps, heads_per_program=hpp)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", choices=("tiny", "base"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--warps", default="2,4,8", help="comma list of num_warps to try")
    parser.add_argument("--hpp", default=None, help="comma list of heads-per-program to try (default: all)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)  # a CUDA device this machine lacks: one line, exit 2
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("tune_triton: --device cpu needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    from rsir_kernels import reference
    from rsir_kernels.backends.triton import config, launch
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"tune_triton: {name}, {dtype}, batch {args.batch}, RSIR-{args.model[0].upper()}; "
          "kernel times in us (CUDA-graph replays)")
    stages = {int(s) for s in args.stages.split(",")}
    failed = 0
    for shape in stage_shapes(args.model):
        if shape.stage not in stages:
            continue
        inp = make_inputs(shape, args.batch, device, dtype)
        q, k, v = inp.qkv.detach().unbind(2)
        index = inp.index.contiguous()
        scale = shape.head_dim ** -0.5
        out, lse = torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1], device=device)
        dqkv = torch.empty_like(inp.qkv)
        leaves = [t.float().requires_grad_() for t in (q, k, v)]
        expected = reference.window_attention_reference(*leaves, index, N, scale)
        expected_grad = torch.stack(torch.autograd.grad(expected, leaves, inp.dout.float()), dim=2)
        expected = expected.detach()
        tol = 1e-4 if dtype == torch.float32 else 2e-2  # relative to the largest |value|
        base = config.make_config(q.shape[0], q.shape[1], q.shape[2], GROUPS, q.shape[3], N, dtype, device)
        print(f"\nstage {shape.stage} ({shape.describe()}): block {base.block_m}, block_d {base.block_d}, "
              f"single {base.single}, windows/program {base.windows_per_program}")
        print(f"  {'warps':>5s} {'heads/prog':>10s} {'fwd us':>8s} {'bwd us':>8s}  check")
        rows = []
        warps = tuple(int(w) for w in args.warps.split(","))
        hpps = None if args.hpp is None else {int(h) for h in args.hpp.split(",")}
        for cfg in candidates(base, shape.heads // GROUPS, warps, hpps):
            try:
                launch.forward_into(q, k, v, index, N, scale, out, lse, config=cfg)
                launch.backward_into(inp.dout, q, k, v, index, N, scale, dqkv, config=cfg)
                err = max(float((out.float() - expected).abs().max() / expected.abs().max()),
                          float((dqkv.float() - expected_grad).abs().max() / expected_grad.abs().max()))
                ok = err < tol
                fwd = kernel_us(lambda: launch.forward_into(q, k, v, index, N, scale, out, lse, config=cfg), device)
                bwd = kernel_us(lambda: launch.backward_into(inp.dout, q, k, v, index, N, scale, dqkv,
                                                             config=cfg), device)
                rows.append((fwd + bwd, cfg))
                mark = "*" if cfg == base else " "
                print(f"{mark} {cfg.num_warps:5d} {cfg.heads_per_program:10d} {fwd:8.1f} {bwd:8.1f}  "
                      f"{'ok' if ok else 'WRONG'} (max rel err {err:.1e})", flush=True)
                failed += not ok
            except Exception as exc:  # noqa: BLE001  (a config that fails to compile is a finding, not a stop)
                print(f"  {cfg.num_warps:5d} {cfg.heads_per_program:10d}  failed: {type(exc).__name__}: "
                      f"{str(exc)[:80]}", flush=True)
        if rows:
            best = min(rows, key=lambda r: r[0])[1]
            print(f"  fastest fwd+bwd: warps {best.num_warps}, heads/program {best.heads_per_program}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
