"""Deployment with no rsir_kernels in the process: a graph exported with the cpp backend calls
the C++-registered ops, which the ops library alone (rsir_kernels.library_path(), loaded with
torch.ops.load_library, or dlopen from C++) supplies to torch.export.load and to AOTInductor's
packages. Each run elsewhere must give the bits the same artifact gives in this process.

Two subjects: a module calling the C++ forward op directly, and rsir_micro exported by
rsir_kernels.deploy (whose graph must hold no op defined from Python, `python_only_ops`, only
the cpp backend's). rsir_kernels.deploy's artifacts take any batch and refuse another
resolution, from Python and from C++, with one error naming the accepted and the given shape;
with dynamic_size, every size in it (compared with eager at each) and no other.
"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import rsir_kernels as rk
import rsir_kernels.deploy as deploy
from rsir_kernels import models
from rsir_kernels._aoti_input_check import CPP_HELPERS, failing_guard, guard_to_cpp

from util import max_rel_error

AVAILABLE = rk.available_backends()["cpp"]
REQUIRE_EXT = os.environ.get("RSIR_REQUIRE_EXT", "0") not in ("", "0")
pytestmark = pytest.mark.skipif(not AVAILABLE.available and not REQUIRE_EXT,
                                reason=f"backend 'cpp' unavailable: {AVAILABLE.reason}")
HERE = os.path.dirname(os.path.abspath(__file__))
RUNNER_SOURCE = os.path.join(HERE, os.pardir, "examples", "aoti_cpp")
# one thread everywhere: Inductor's reductions may split work by thread count
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
# rsir_micro's deployment: built for 64x64 (the finding: fed 96x96 or a batch of 3, a package
# exported by hand answered for a shape it was not built for)
SIZE = (64, 64)
REFUSED = (1, 3, 96, 96)
MICRO = pytest.mark.parametrize("deployed", ["rsir_micro"], indirect=True)  # the op's is exported by hand


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
    """(module, {input name: input}); the first input is the export's example."""
    torch.manual_seed(0)
    if name == "op":
        return OpModule(), {"x": torch.randn(2, 50, 3, 4, 8)}
    model = models.rsir_micro(num_classes=10, backend="cpp").eval()
    return model, {"batch1": torch.randn(1, 3, *SIZE), "batch3": torch.randn(3, 3, *SIZE)}


def python_only_ops(graph: torch.fx.Graph) -> set:
    """Ops in the graph defined from Python outside torch (torch.library.custom_op, Library.define):
    a process with only torch and the ops library can't run them."""
    return {str(node.target) for node in graph.nodes
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace not in ("aten", "prims")
            and node.target._schema.name in torch.library._defs}


@pytest.fixture(scope="module", params=["op", "rsir_micro"])
def deployed(request, tmp_path_factory):
    """The subject exported and saved (torch.export.save), compiled to an AOTInductor package
    (rsir_micro through rsir_kernels.deploy, the op by hand: its input is no image); and what
    each gives in this process."""
    module, inputs = _subject(request.param)
    example = next(iter(inputs.values()))
    folder = tmp_path_factory.mktemp(request.param)
    paths = {name: str(folder / name) for name in ("program.pt2", "package.pt2", "inputs.pt")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            if request.param == "op":
                program = torch.export.export(module, (example,))
                torch.export.save(program, paths["program.pt2"])
                torch._inductor.aoti_compile_and_package(program, package_path=paths["package.pt2"])
            else:
                program = deploy.export_program(module, example, paths["program.pt2"])
                deploy.export_aoti(module, example, paths["package.pt2"])
            found = python_only_ops(program.graph)
            assert not found, f"the exported graph holds Python-only op(s) {sorted(found)}: no torch-only process runs them"
            torch.save(inputs, paths["inputs.pt"])
            loaded = torch.export.load(paths["program.pt2"]).module()
            package = torch._inductor.aoti_load_package(paths["package.pt2"])
            outputs = {name: {"program": loaded(x), "package": package(x), "eager": module(x)}
                       for name, x in inputs.items()}
    finally:
        torch.set_num_threads(threads)
    return dict(paths, name=request.param, folder=folder, inputs=inputs, outputs=outputs, model=module)


CHILD = textwrap.dedent("""
    import sys, torch
    library, program, package, inputs, refused, out = sys.argv[1:]
    torch.ops.load_library(library)
    routes = {"program": torch.export.load(program).module(), "package": torch._inductor.aoti_load_package(package)}
    outputs, errors = {}, {}
    with torch.no_grad():
        for name, x in torch.load(inputs).items():
            outputs[name] = {route: fn(x) for route, fn in routes.items()}
        if refused:
            for route, fn in routes.items():
                try:
                    fn(torch.zeros(*map(int, refused.split(","))))
                except Exception as exc:
                    errors[route] = str(exc)
    assert not any(name.startswith("rsir_kernels") for name in sys.modules), "rsir_kernels was imported"
    torch.save({"outputs": outputs, "errors": errors}, out)
""")


@pytest.fixture(scope="module")
def child(deployed):
    """What a process with only torch and the ops library gets from the saved program and the
    package: outputs for each input, and (rsir_micro) the error each route raises at 96x96."""
    out = str(deployed["folder"] / "child.pt")
    refused = ",".join(map(str, REFUSED)) if deployed["name"] == "rsir_micro" else ""
    run = subprocess.run([sys.executable, "-c", CHILD, rk.library_path(), deployed["program.pt2"],
                          deployed["package.pt2"], deployed["inputs.pt"], refused, out],
                         env=ONE_THREAD, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return torch.load(out)


def test_torch_only_process_runs_exported_program_and_package_bitwise(deployed, child):
    for name, outputs in deployed["outputs"].items():
        for route in ("program", "package"):
            assert torch.equal(child["outputs"][name][route], outputs[route]), (name, route)


def refusal(size=SIZE, given=REFUSED):
    """The package's error for images of shape `given`: the accepted and the given shape."""
    return f"this package takes (B, 3, {size[0]}, {size[1]}) with B >= 1; got ({', '.join(map(str, given))})"


@MICRO
def test_aoti_package_takes_any_batch_and_refuses_another_resolution(deployed, child):
    """Batches 1, 3 (and 5 here) equal eager (top-1: rsir_micro has IR-Win heads, docs/deployment.md,
    "Routes and what they equal"); another resolution or channel count raises, here and in a torch-only
    process, naming both shapes."""
    package = torch._inductor.aoti_load_package(deployed["package.pt2"])
    model, images = deployed["model"], torch.randn(5, 3, *SIZE)
    with torch.no_grad():
        outputs = {**{name: out["package"] for name, out in deployed["outputs"].items()}, "batch5": package(images)}
        eager = {**{name: out["eager"] for name, out in deployed["outputs"].items()}, "batch5": model(images)}
    for name, logits in outputs.items():
        assert logits.shape == eager[name].shape, name
        assert torch.equal(logits.argmax(-1), eager[name].argmax(-1)), name
    for shape in (REFUSED, (3, 3, 32, 32), (2, 3, 64, 96), (2, 4, *SIZE)):
        with pytest.raises(RuntimeError) as raised, torch.no_grad():
            package(torch.zeros(shape))
        assert refusal(given=shape) in str(raised.value)
    assert refusal() in child["errors"]["package"]


@MICRO
def test_exported_program_takes_any_batch_and_refuses_another_resolution(deployed, child):
    """The saved program equals eager bit for bit at batches 1 and 3 (in this process) and
    refuses 96x96 here and in a torch-only process (torch's check names the height's size)."""
    for name, outputs in deployed["outputs"].items():
        assert torch.equal(outputs["program"], outputs["eager"]), name
    loaded = torch.export.load(deployed["program.pt2"]).module()
    with pytest.raises(Exception, match=r"size\(\)\[2\] == 64"):
        loaded(torch.zeros(REFUSED))
    assert "size()[2] == 64" in child["errors"]["program"]


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


def call_runner(runner, package, x_path, repeats=0):
    return subprocess.run([runner, rk.library_path(), package, x_path, str(repeats)], env=ONE_THREAD,
                          capture_output=True, text=True, timeout=600)


def run_cpp(runner, package, x_path, repeats=0):
    """Logits the C++ runner prints (float32, exact) and its time per call in ms, if timed."""
    done = call_runner(runner, package, x_path, repeats)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    shape = tuple(int(n) for n in lines[0].split()[1:])
    logits = torch.tensor([[float(v) for v in line.split()] for line in lines[1:1 + shape[0]]])
    ms = float(lines[-1].split()[1]) if repeats else None
    return logits.reshape(shape), ms


def test_cpp_runner_prints_the_package_output_bitwise(deployed, runner):
    for name, x in deployed["inputs"].items():
        path = str(deployed["folder"] / f"{name}.pt")
        torch.save(x, path)
        logits, _ = run_cpp(runner, deployed["package.pt2"], path)
        assert torch.equal(logits, deployed["outputs"][name]["package"]), name


@MICRO
def test_cpp_runner_refuses_another_resolution_with_one_line_and_exit_3(deployed, runner):
    path = str(deployed["folder"] / "refused.pt")
    torch.save(torch.zeros(REFUSED), path)
    done = call_runner(runner, deployed["package.pt2"], path)
    assert done.returncode == 3, done.stderr[-3000:]
    assert done.stdout == "" and len(done.stderr.splitlines()) == 1, done.stderr[-3000:]
    assert refusal() in done.stderr


# Dynamic height and width: rsir_micro with 2x2 windows (a whole number of windows per side at
# every stage for sides in multiples of 64; 64 itself leaves one window per side in the last
# stage, a case the graph specializes away) and every head RS-Win (no data-dependent order:
# values compared at the fp32 rule).
DYNAMIC = range(128, 257, 64)


@pytest.fixture(scope="module")
def dynamic_package(tmp_path_factory):
    torch.manual_seed(0)
    model = models.rsir_micro(num_classes=10, backend="cpp", window_size=2,
                              rs_heads=models.RSIR_MICRO.num_heads).eval()
    path = str(tmp_path_factory.mktemp("dynamic") / "package.pt2")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        deploy.export_aoti(model, torch.randn(1, 3, 128, 128), path, dynamic_size=DYNAMIC)
    finally:
        torch.set_num_threads(threads)
    return model, path


def test_aoti_package_with_dynamic_size_matches_eager_at_every_size_and_refuses_others(dynamic_package):
    model, path = dynamic_package
    package = torch._inductor.aoti_load_package(path)
    accepted = "(B, 3, H, W) with B >= 1, H in 128..256 in steps of 64, W in 128..256 in steps of 64"
    assert package.get_metadata()["rsir_kernels.accepts"] == accepted
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for height in DYNAMIC:
            for width in DYNAMIC:
                for batch in (1, 3):
                    images = torch.randn(batch, 3, height, width)
                    with torch.no_grad():
                        logits, eager = package(images), model(images)
                    assert logits.shape == eager.shape
                    assert max_rel_error(logits, eager) <= 1e-5, (batch, height, width)
        for shape in ((1, 3, 64, 128), (1, 3, 160, 128), (2, 3, 128, 320), (1, 3, 128, 129)):
            with pytest.raises(RuntimeError) as raised, torch.no_grad():
                package(torch.zeros(shape))
            assert f"this package takes {accepted}; got ({', '.join(map(str, shape))})" in str(raised.value)
    finally:
        torch.set_num_threads(threads)


def test_cpp_runner_runs_a_dynamic_size_package_at_another_size_bitwise(dynamic_package, runner, tmp_path):
    _, path = dynamic_package
    images = torch.randn(2, 3, 192, 256)
    torch.save(images, str(tmp_path / "images.pt"))
    logits, _ = run_cpp(runner, path, str(tmp_path / "images.pt"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            assert torch.equal(logits, torch._inductor.aoti_load_package(path)(images))
    finally:
        torch.set_num_threads(threads)


def test_dynamic_size_the_graph_does_not_hold_for_is_refused_at_export():
    """rsir_micro's 7x7 windows: a 64x64 graph has the window shrunk to the last stage's 4 tokens
    and no square tiling, which other sizes change: export names the sizes it can't take."""
    model = models.rsir_micro(num_classes=10, backend="cpp").eval()
    with pytest.raises(ValueError, match=r"dynamic_size=range\(64, 257, 32\), max_batch=None: the model's graph "
                                         r"does not hold for \(H, W\) in \[\(64, 96\)"):
        deploy.export_program(model, torch.randn(1, 3, 64, 64), dynamic_size=range(64, 257, 32))


def test_export_aoti_rejects_bad_arguments(tmp_path):
    model, path = models.rsir_micro(num_classes=10, backend="cpp").eval(), str(tmp_path / "m.pt2")
    images = torch.randn(1, 3, 64, 64)
    cases = [((lambda x: x, images, path), {}, TypeError, "model must be a torch.nn.Module"),
             ((model, images.numpy(), path), {}, TypeError, "example_images must be a torch.Tensor"),
             ((model, images[0], path), {}, ValueError, r"example_images must be .* \(3, 64, 64\)"),
             ((model, images.long(), path), {}, ValueError, "floating-point"),
             ((model, images, str(tmp_path / "m.so")), {}, ValueError, "package_path must be a path ending in .pt2"),
             ((model, images, path), {"max_batch": 1}, ValueError, "max_batch must be None or an int >= 2"),
             ((model, images, path), {"dynamic_size": range(128, 257, 64)}, ValueError, "must hold example_images' height 64"),
             ((model, images, path), {"dynamic_size": (64, 128)}, ValueError, "dynamic_size must be None"),
             ((model, images, path), {"inductor_configs": ["x"]}, TypeError, "inductor_configs must be a dict")]
    for args, kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            deploy.export_aoti(*args, **kwargs)
    with pytest.raises(ValueError, match="model is in training mode"):
        deploy.export_aoti(model.train(), images, path)
    assert not os.path.exists(path)


def test_guards_compile_to_cpp_with_python_integer_division():
    cpp = guard_to_cpp("torch.sym_max(1, ((-1)*L['images'].size()[2]) % 4) == 0 or 1 < L['x'].size()[3] // 7 <= 9")
    assert cpp == ("((std::max<int64_t>(INT64_C(1), py_mod(((-INT64_C(1)) * s2), INT64_C(4), defined)) == INT64_C(0)) || "
                   "((INT64_C(1) < py_floordiv(s3, INT64_C(7), defined)) && (py_floordiv(s3, INT64_C(7), defined) <= INT64_C(9))))")
    with pytest.raises(ValueError, match="can't compile torch.export's guard"):
        guard_to_cpp("L['images'].stride()[0] == 1")


# guards of torch.export's kind: floor division and modulo of negative numbers, by zero (at
# size 3 == 3), or, chained comparisons, sym_max / sym_min
GUARDS = ["(((-1)*L['x'].size()[2]) % 4) == 0", "((1 + (((-3) + L['x'].size()[2]) // 4)) % 7) != 0",
          "(L['x'].size()[3] // 7) != 1 or L['x'].size()[2] < -5",
          "torch.sym_max(1, L['x'].size()[2] % (L['x'].size()[3] - 3)) == 1",
          "1 < torch.sym_min(L['x'].size()[2], -L['x'].size()[3]) // -3 <= 4"]


def test_compiled_guards_agree_with_python(tmp_path):
    """Each guard compiled to C++ (as a package's check runs it) against Python's evaluation
    (as ExportedProgram.module() runs it; a zero divisor fails the guard) on a grid of sizes."""
    if shutil.which("c++") is None:
        pytest.skip("no c++ on PATH")
    sizes = [(s2, s3) for s2 in range(-20, 21) for s3 in range(13)]
    body = "\n".join(f"    {{ bool defined = true; const bool holds = {guard_to_cpp(g)}; "
                     f"std::printf(\"%d\", int(defined && holds)); }}" for g in GUARDS)
    source = tmp_path / "guards.cpp"
    source.write_text(f"#include <algorithm>\n#include <cstdint>\n#include <cstdio>\n{CPP_HELPERS}"
                      f"int main() {{\n  for (int64_t s2 = -20; s2 <= 20; ++s2) for (int64_t s3 = 0; s3 < 13; ++s3) {{\n"
                      f"{body}\n    std::printf(\"\\n\");\n  }}\n}}\n")
    subprocess.run(["c++", "-std=c++17", "-o", str(tmp_path / "guards"), str(source)], check=True, timeout=300)
    printed = subprocess.run([str(tmp_path / "guards")], capture_output=True, text=True, check=True).stdout.split()
    failed = [failing_guard([g], [(1, 3, s2, s3) for s2, s3 in sizes]) for g in GUARDS]
    expected = ["".join("0" if (1, 3, s2, s3) in f else "1" for f in failed) for s2, s3 in sizes]
    assert printed == expected
    assert any("0" in line for line in expected) and any("1" in line for line in expected)


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
