"""The layout of csrc/ (issue 29), read from its `#include` lines, no build: no include cycle, no
source file over 500 lines, every quoted include resolves, headers guarded, no header pasted
into a namespace, the torch-free cores free of torch, and the CPU core's layering
(csrc/kernels/cpu/core/: each header includes only headers below it; the ISA units include the
core once, through isa_unit.h, after every outside header it needs: no inline function of a
shared header is compiled for a wider instruction set than the generic build's)."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
INCLUDE_DIRS = [os.path.join(CSRC, "include"), CSRC]  # setup.py's and CMake's include path
SOURCES = (".h", ".hpp", ".cuh", ".cpp", ".cc", ".cu")
MAX_LINES = 500
INCLUDE = re.compile(r'^\s*#\s*include\s*([<"])([^>"]+)[>"]')
TORCH_HEADERS = ("torch/", "ATen/", "c10/", "pybind11/", "Python.h")

CORE = "kernels/cpu/core"
# The CPU core's layers, bottom up: a header includes headers of lower layers only.
CORE_LAYERS = {
    "config.h": 0,
    "types.h": 1, "vectors.h": 1,
    "gemm.h": 2, "softmax.h": 2, "rows.h": 2, "scratch.h": 2,
    "softmax_grad.h": 3, "staged.h": 3, "prefetch.h": 3,
    "forward.h": 4,
    "backward.h": 5, "bf16_amx.h": 5,
    "entry.h": 6,
}
# What the core may include from outside core/ (isa_unit.h includes them before the target pragma).
CORE_OUTSIDE = {"include/rsir/params.h", "kernels/cpu/window_attention_cpu.h"}
ISA_UNIT = "kernels/cpu/isa_unit.h"
ISA_FILES = ["kernels/cpu/kernel_generic.cpp", "kernels/cpu/kernel_avx2.cpp", "kernels/cpu/kernel_avx512.cpp",
             "kernels/cpu/kernel_avx512amx.cpp"]


def _rel(path):
    return os.path.relpath(path, CSRC).replace(os.sep, "/")


def _files():
    out = []
    for dirpath, _, names in os.walk(CSRC):
        out += [os.path.join(dirpath, n) for n in names if n.endswith(SOURCES) or n.endswith(".py")]
    return sorted(out)


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return f.read().split("\n")


def _includes(path):
    """[(line number, '<' or '"', name, resolved csrc-relative path or None)]."""
    out = []
    for no, line in enumerate(_lines(path)):
        m = INCLUDE.match(line)
        if not m:
            continue
        kind, name = m.groups()
        resolved = None
        if kind == '"':
            for d in [os.path.dirname(path)] + INCLUDE_DIRS:
                if os.path.isfile(os.path.join(d, name)):
                    resolved = _rel(os.path.normpath(os.path.join(d, name)))
                    break
        out.append((no, kind, name, resolved))
    return out


GRAPH = {_rel(p): _includes(p) for p in _files() if not p.endswith(".py")}


def test_quoted_includes_resolve():
    bad = [f"{f}: {name}" for f, incs in GRAPH.items() for _, kind, name, res in incs if kind == '"' and not res]
    assert not bad, bad


def test_no_include_cycle():
    state, stack = {}, []

    def visit(f):
        state[f] = "open"
        stack.append(f)
        for _, _, _, dep in GRAPH.get(f, []):
            if dep is None:
                continue
            assert state.get(dep) != "open", "include cycle: " + " -> ".join(stack[stack.index(dep):] + [dep])
            if dep not in state:
                visit(dep)
        stack.pop()
        state[f] = "done"

    for f in GRAPH:
        if f not in state:
            visit(f)


def test_no_file_over_500_lines():
    long = {}
    for p in _files():
        n = sum(1 for _ in open(p, encoding="utf-8"))
        if n > MAX_LINES:
            long[_rel(p)] = n
    assert not long, long


def test_headers_are_guarded():
    for f in GRAPH:
        if f.endswith((".h", ".hpp", ".cuh")):
            text = "\n".join(_lines(os.path.join(CSRC, f)))
            assert "#pragma once" in text or re.search(r"#ifndef (\w+)\s*\n\s*#define \1", text), f


def test_no_include_inside_a_namespace():
    """No header is pasted into a namespace: every #include comes before the file's first
    namespace (each header opens its own)."""
    for f, incs in GRAPH.items():
        lines = _lines(os.path.join(CSRC, f))
        first_ns = next((i for i, line in enumerate(lines) if re.match(r"\s*namespace\b", line)), len(lines))
        late = [name for no, _, name, _ in incs if no > first_ns]
        assert not late, f"{f}: #include after a namespace opens: {late}"


def test_kernels_are_torch_free():
    for f, incs in GRAPH.items():
        if not f.startswith(("kernels/", "include/")):
            continue
        for _, kind, name, res in incs:
            assert not name.startswith(TORCH_HEADERS), f"{f} includes {name}"
            assert not (res or "").startswith("torch/"), f"{f} includes {res}"


def test_core_layers():
    core = {f for f in GRAPH if f.startswith(CORE + "/")}
    assert core == {f"{CORE}/{name}" for name in CORE_LAYERS}, "a header of core/ without a layer here (or gone)"
    for f in sorted(core):
        layer = CORE_LAYERS[os.path.basename(f)]
        text = "\n".join(_lines(os.path.join(CSRC, f)))
        if f != f"{CORE}/config.h":
            assert "namespace rsir::cpu::RSIR_CPU_BUILD {" in text, f"{f}: not in the build's namespace"
            assert f'#include "{CORE}/config.h"' in text, f"{f}: does not include config.h"
        for _, kind, name, res in GRAPH[f]:
            if kind == "<":
                continue
            if res.startswith(CORE + "/"):
                below = CORE_LAYERS[os.path.basename(res)]
                assert below < layer, f"{f} (layer {layer}) includes {res} (layer {below})"
            else:
                assert res in CORE_OUTSIDE, f"{f} includes {res}, outside the core"


def test_isa_units_include_the_core_after_its_outside_headers():
    """isa_unit.h includes every header that the core includes from outside core/ before its
    target pragma, so that none is first compiled for the target; the ISA files are its
    settings and one include; nothing else includes it or the core's entry."""
    unit = _lines(os.path.join(CSRC, ISA_UNIT))
    pragma = next(i for i, line in enumerate(unit) if "push_options" in line)
    before = {name for no, _, name, _ in GRAPH[ISA_UNIT] if no < pragma}
    needed = {name for f in GRAPH if f.startswith(CORE + "/") for _, kind, name, res in GRAPH[f]
              if kind == "<" or not res.startswith(CORE + "/")}
    assert needed <= before, f"{ISA_UNIT}: include before the target pragma: {sorted(needed - before)}"
    assert [name for no, _, name, _ in GRAPH[ISA_UNIT] if no > pragma] == [f"{CORE}/entry.h"]
    for f in ISA_FILES:
        assert [name for _, _, name, _ in GRAPH[f]] == [ISA_UNIT], f
        assert len(_lines(os.path.join(CSRC, f))) <= 12, f
    users = {f for f, incs in GRAPH.items() for _, _, _, res in incs if res in (ISA_UNIT, f"{CORE}/entry.h")}
    assert users == set(ISA_FILES) | {ISA_UNIT}, users


@pytest.mark.parametrize("rule", ["cycle", "layer"])
def test_the_checks_catch_a_violation(rule, monkeypatch):
    """The checks above fail on a cycle and on an include up the layers (a fake graph)."""
    fake = {k: list(v) for k, v in GRAPH.items()}
    gemm, entry = f"{CORE}/gemm.h", f"{CORE}/entry.h"
    if rule == "cycle":
        fake[f"{CORE}/types.h"].append((10 ** 6, '"', gemm, gemm))
        check = test_no_include_cycle
    else:
        fake[gemm] = fake[gemm] + [(10 ** 6, '"', entry, entry)]
        check = test_core_layers
    monkeypatch.setitem(globals(), "GRAPH", fake)
    with pytest.raises(AssertionError):
        check()
