"""Inference time of each deployment route against eager, on this machine's CPU.

    python examples/deploy_speed.py --model rsir_tiny --batch 1 [--runner build/aoti_cpp/runner]

Routes: eager; torch.compile; torch.export's program and the AOTInductor package as
rsir_kernels.deploy makes them (a dynamic batch), the package from Python and (with --runner,
examples/aoti_cpp built) from C++; ONNX Runtime (when onnxruntime is installed).
Each: the median of --repeats calls after two warm-up calls, and its ratio to eager measured in
the same run. A route that can't run here prints why.
"""
import argparse
import os
import statistics
import subprocess
import tempfile
import time

import torch

import rsir_kernels as rk
from rsir_kernels import deploy
from rsir_kernels import models


def median_ms(fn, x, repeats):
    for _ in range(2):
        fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def routes(model, x, folder, runner, repeats):
    """(route, callable or a time in ms) in the order they are printed."""
    yield "eager", model
    yield "torch.compile", torch.compile(model)
    # as deployed: a dynamic batch, and a package that refuses another shape (rsir_kernels.deploy)
    yield "torch.export", deploy.export_program(model, x).module()
    package = deploy.export_aoti(model, x, os.path.join(folder, "model.pt2"))
    yield "AOTInductor (Python)", torch._inductor.aoti_load_package(package)
    if runner:
        images = os.path.join(folder, "images.pt")
        torch.save(x, images)
        done = subprocess.run([runner, rk.library_path(), package, images, str(repeats)], capture_output=True,
                              text=True)
        why = done.stderr.strip().splitlines()[-1:]  # the runner's one line
        yield "AOTInductor (C++)", float(done.stdout.split()[-1]) if done.returncode == 0 else f"failed: {why}"
    try:
        import onnxruntime
        import rsir_kernels.onnx
    except ImportError as exc:
        yield "ONNX Runtime", f"not installed ({exc})"
        return
    path = os.path.join(folder, "model.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                      custom_translation_table=rsir_kernels.onnx.translation_table())
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many threads as the other routes
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    yield "ONNX Runtime", lambda images: session.run(None, {name: images.numpy()})


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="rsir_tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--runner", help="examples/aoti_cpp's runner binary")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = getattr(models, args.model)(backend="cpp").eval()
    x = torch.randn(args.batch, 3, args.resolution, args.resolution)
    print(f"{args.model}, batch {args.batch}, {args.resolution}x{args.resolution}, backend cpp, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    eager_ms = None
    with torch.inference_mode(), tempfile.TemporaryDirectory() as folder:
        for name, fn in routes(model, x, folder, args.runner, args.repeats):
            if isinstance(fn, str):
                print(f"{name:<22} {fn}")
                continue
            ms = fn if isinstance(fn, float) else median_ms(fn, x, args.repeats)
            eager_ms = eager_ms or ms
            print(f"{name:<22} {ms:9.2f} ms  {eager_ms / ms:5.2f}x eager", flush=True)


if __name__ == "__main__":
    main()
