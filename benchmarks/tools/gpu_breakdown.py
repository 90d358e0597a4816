"""Where the time of one attention call goes on a GPU: device (kernel) time against host time.

    python -m benchmarks.tools.gpu_breakdown [--batch 64] [--stages 1,2,3,4] [--calls 200]

For each RSIR-T stage shape and each row of bench_attn (backends and baselines), prints
  eager   median of CUDA events around one call after an L2 flush (bench_attn's measure),
  device  the GPU time of one call, from torch.profiler (sum of the kernels' self device time),
  host    the CPU time to issue one call (perf_counter over `--calls` calls, no sync inside);
          when host > device the GPU waits on Python and the eager figure is host-bound,
for the forward and for forward+backward, and for the triton backend the host time of its
layers (the bare Triton launch into preallocated buffers, the backend's custom op, the public
op). GPU only; a measurement that fails prints its error in its cell instead of stopping.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common.cases import N, backend_row, baseline_rows, make_inputs, stage_shapes
from benchmarks.common.cli import resolve_device
from benchmarks.common.measure import summarize
from benchmarks.common.timing import Timer, TimingPolicy, forward_backward_fn, forward_fn


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_ms(fn, reps: int = 20) -> float:
    """Mean GPU time of fn() in ms: the time of the CUDA kernels and copies it ran, per call.
    Only events on the device count: summing every event's self device time counted each
    kernel twice (once more under the op that launched it; H200 run of 2026-11-26)."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(min(3, reps)):
        fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync()
    on_device = (torch.autograd.DeviceType.CUDA,)
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type in on_device)
    return total_us / reps / 1e3


def host_ms(fn, calls: int) -> float:
    """CPU time per call of `calls` back-to-back calls (no sync inside the loop), in ms."""
    for _ in range(min(3, calls)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    return (t1 - t0) / calls * 1e3


def cell(measure, *args) -> str:
    try:
        return f"{measure(*args):8.3f}"
    except Exception as exc:  # noqa: BLE001  (one failed cell must not cost the others)
        return f"  ERR {type(exc).__name__}: {str(exc)[:60]}"


def triton_layers(inp, calls: int) -> list[tuple[str, str]]:
    """Host ms per call of each layer of the triton backend's forward."""
    from rsir_kernels import ops
    from rsir_kernels.backends.triton import config, custom_ops, launch
    q, k, v = inp.qkv.detach().unbind(2)
    index = inp.index.to(torch.int32).contiguous()
    scale = q.shape[-1] ** -0.5
    out, lse = torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1], device=q.device)
    cfg = config.make_config(q.shape[0], q.shape[1], q.shape[2], index.shape[1], q.shape[3], N,
                             q.dtype, q.device)
    dout, dqkv = torch.randn_like(q), torch.empty_like(inp.qkv)
    launch.forward_into(q, k, v, index, N, scale, out, lse, config=cfg)
    layers = [
        ("bare launch (forward_into, config given)",
         lambda: launch.forward_into(q, k, v, index, N, scale, out, lse, config=cfg)),
        ("bare backward launch (backward_into, config given)",
         lambda: launch.backward_into(dout, q, k, v, index, N, scale, dqkv, config=cfg)),
        ("forward_into (config computed)", lambda: launch.forward_into(q, k, v, index, N, scale, out, lse)),
        ("custom op rsir::window_attention_triton (the op path)",
         lambda: custom_ops.window_attention_fwd(q, k, v, index, N, scale)),
        ("launch.forward (what the eager path runs)", lambda: launch.forward(q, k, v, index, N, scale)),
        ("rk.window_attention, no grad, check_index=False",
         lambda: ops.window_attention(q, k, v, inp.index, N, backend="triton", check_index=False)),
        ("rk.window_attention, no grad, check_index=True",
         lambda: ops.window_attention(q, k, v, inp.index, N, backend="triton")),
    ]
    with torch.no_grad():
        return [(name, cell(host_ms, fn, calls)) for name, fn in layers]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--reps", type=int, default=20, help="profiled calls per device-time figure")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the script (TRITON_INTERPRET=1)")
    args = parser.parse_args(argv)
    device = resolve_device(parser, args.device)  # a CUDA device this machine lacks: one line, exit 2
    dtype = getattr(torch, args.dtype)
    few = args.reps < 10  # a smoke run: as few timed calls as the figures allow
    timer = Timer(device, TimingPolicy(warmup=1 if few else 3, min_reps=args.reps if few else 10,
                                       max_reps=args.reps if few else 50, budget_s=0.0 if few else 0.3))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (dry run)"
    print(f"gpu_breakdown: {name}, {args.dtype}, batch {args.batch}, "
          f"torch {torch.__version__}; times in ms per call")
    wanted = {int(s) for s in args.stages.split(",")}
    for shape in stage_shapes("tiny"):
        if shape.stage not in wanted:
            continue
        inp = make_inputs(shape, args.batch, device, dtype)
        rows = [backend_row(name, inp) for name in ("triton", "cpp")] + baseline_rows(inp)
        print(f"\nstage {shape.stage} ({shape.describe()})")
        print(f"{'row':14s} {'eager f':>8s} {'device f':>8s} {'host f':>8s}   "
              f"{'eager fb':>8s} {'device fb':>9s} {'host fb':>8s}")
        for row in rows:
            fwd, fb = forward_fn(row), forward_backward_fn(row)
            eager_f = cell(lambda: summarize(timer(fwd))["median"])
            eager_fb = cell(lambda: summarize(timer(fb))["median"])
            print(f"{row.name:14s} {eager_f} {cell(device_ms, fwd, args.reps)} {cell(host_ms, fwd, args.calls)}   "
                  f"{eager_fb} {cell(device_ms, fb, args.reps)} {cell(host_ms, fb, max(1, args.calls // 4))}", flush=True)
        for name, value in triton_layers(inp, args.calls):
            print(f"    triton host: {name:50s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
