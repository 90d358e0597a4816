"""Deployment with no rsir_kernels in the process: a graph exported with the cpp backend calls
the C++-registered ops, which the ops library alone (rsir_kernels.library_path(), loaded with
torch.ops.load_library, or dlopen from C++) supplies to torch.export.load and to AOTInductor's
packages. Each run elsewhere must give the bits the same artifact gives in this process.

Two subjects: a module calling the C++ forward op directly, and rsir_micro, whose exported
graph must hold no op defined from Python (`python_only_ops`), only the cpp backend's.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import models

AVAILABLE = rk.available_backends()["cpp"]
REQUIRE_EXT = os.environ.get("RSIR_REQUIRE_EXT", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not AVAILABLE.available and not REQUIRE_EXT,
                                reason=f"backend 'cpp' unavailable: {AVAILABLE.reason}")
HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_SOURCE = os.path.join(HERE, os.pardir, "examples", "aoti_cpp")
# one thread everywhere: Inductor's reductions may split work by thread count
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")


class OpModule(torch.nn.Module):
    """(B, L, 3, H, D) qkv -> (B, L*H*D): the C++ forward op on a fixed two-group order, with
    a partial last window (L = 50, N = 7)."""

    def __init__(self, length=50, groups=2, window_size=7):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("index", torch.stack([torch.randperm(length, generator=gen) for _ in range(groups)])[None])
        self.window_size = window_size

    def forward(self, qkv):
        q, k, v = qkv.unbind(2)
        index = self.index.expand(q.shape[0], -1, -1)
        out = torch.ops.rsir_ext.window_attention_fwd(q, k, v, index, self.window_size, q.shape[-1] ** -0.5)
        out = out[0] if isinstance(out, (tuple, list)) else out  # (out, lse) or out alone
        return out.flatten(1)


def _subject(name):
    torch.manual_seed(0)
    if name == "op":
        return OpModule(), torch.randn(2, 50, 3, 4, 8)
    return models.rsir_micro(num_classes=10, backend="cpp").eval(), torch.randn(2, 3, 32, 32)


def python_only_ops(graph: torch.fx.Graph) -> set:
    """Ops in the graph defined from Python outside torch (torch.library.custom_op, Library.define):
    a process with only torch and the ops library can't run them."""
    return {str(node.target) for node in graph.nodes
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "prims")
            and node.target._schema.name in torch.library._defs}


@pytest.fixture(scope="module", params=["op", "rsir_micro"])
def deployed(request, tmp_path_factory):
    """The subject exported, saved with torch.export.save, compiled to an AOTInductor package;
    and what each gives in this process."""
    module, x = _subject(request.param)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            program = torch.export.export(module, (x,))
            found = python_only_ops(program.graph)
            assert not found, f"the exported graph holds Python-only op(s) {sorted(found)}: no torch-only process runs them"
            folder = tmp_path_factory.mktemp(request.param)
            paths = {name: str(folder / name) for name in ("program.pt2", "package.pt2", "x.pt")}
            torch.export.save(program, paths["program.pt2"])
            torch.save(x, paths["x.pt"])
            torch._inductor.aoti_compile_and_package(program, package_path=paths["package.pt2"])
            outputs = {"program": torch.export.load(paths["program.pt2"]).module()(x),
                       "package": torch._inductor.aoti_load_package(paths["package.pt2"])(x)}
    finally:
        torch.set_num_threads(threads)
    return dict(paths, folder=folder, outputs=outputs)


CHILD = textwrap.dedent("""
    import sys, torch
    library, program, package, x, out = sys.argv[1:]
    torch.ops.load_library(library)
    x = torch.load(x)
    with torch.no_grad():
        outputs = {"program": torch.export.load(program).module()(x),
                   "package": torch._inductor.aoti_load_package(package)(x)}
    assert not any(name.startswith("rsir_kernels") for name in sys.modules), "rsir_kernels was imported"
    torch.save(outputs, out)
""")


def test_torch_only_process_runs_exported_program_and_package_bitwise(deployed):
    out = str(deployed["folder"] / "child.pt")
    run = subprocess.run([sys.executable, "-c", CHILD, rk.library_path(), deployed["program.pt2"],
                          deployed["package.pt2"], deployed["x.pt"], out],
                         env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    child = torch.load(out)
    for route in ("program", "package"):
        assert torch.equal(child[route], deployed["outputs"][route]), route


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """examples/aoti_cpp built with CMake against this torch; skips where no compiler is found."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)} on PATH: the C++ example can't be built")
    build = tmp_path_factory.mktemp("aoti_cpp")
    for command in (["cmake", "-S", RUNNER_SOURCE, "-B", str(build), f"-DRSIR_PYTHON={sys.executable}"],
                    ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return str(build / "runner")


def run_cpp(runner, package, x_path, repeats=0):
    """Logits the C++ runner prints (float32, exact) and its time per call in ms, if timed."""
    done = subprocess.run([runner, rk.library_path(), package, x_path, str(repeats)], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    shape = tuple(int(n) for n in lines[0].split()[1:])
    logits = torch.tensor([[float(v) for v in line.split()] for line in lines[1:1 + shape[0]]])
    ms = float(lines[-1].split()[1]) if repeats else None
    return logits.reshape(shape), ms


def test_cpp_runner_prints_the_package_output_bitwise(deployed, runner):
    logits, _ = run_cpp(runner, deployed["package.pt2"], deployed["x.pt"])
    assert torch.equal(logits, deployed["outputs"]["package"])


def test_ops_library_has_no_python_and_finds_torch():
    path = rk.library_path()
    if shutil.which("nm") is None or shutil.which("readelf") is None:
        pytest.skip("nm or readelf (binutils) not found")
    undefined = subprocess.run(["nm", "-D", "--undefined-only", path], capture_output=True, text=True,
                               check=True).stdout.split()
    assert not [s for s in undefined if s.startswith(("Py", "_Py"))]
    dynamic = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    assert "libtorch_python" not in dynamic
    runpath = next(line for line in dynamic.splitlines() if "RUNPATH" in line)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    assert torch_lib in runpath or "$ORIGIN/../torch/lib" in runpath


def test_importing_the_package_after_the_library_registers_nothing_twice():
    """One TORCH_LIBRARY per namespace: importing rsir_kernels after loading the library
    (as a deployment script might) registers nothing twice."""
    code = ("import sys, torch; torch.ops.load_library(sys.argv[1]); import rsir_kernels as rk; "
            "assert rk.available_backends()['cpp'].available, rk.available_backends()['cpp'].reason; "
            "q = torch.randn(1, 9, 2, 4); i = torch.arange(9).view(1, 1, 9); "
            "rk.window_attention(q, q, q, i, 4, backend='cpp')")
    run = subprocess.run([sys.executable, "-c", code, rk.library_path()], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.path.join(HERE, os.pardir)))
    assert run.returncode == 0, run.stderr[-3000:]
