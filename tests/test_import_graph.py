"""The import graph of rsir_kernels/ points one way: core < models < applications < train.

Every import statement counts, those inside functions too (a lazy import is still a
dependency), relative ones resolved. A module may import its own layer and the layers below;
an arrow up is a failure naming its file, line and statement. Neither the modules nor the
units (top-level modules and subpackages) form a cycle (a package's __init__ is a module like
any other: its submodules import their shared names from a module of their own, as
backends/registry.py, not from the package). Layers by name; a top-level module or package not
named here (a new one) is core:

    core          reference, samplers, ops, backends/, modules, checkpoint_format, ... (unnamed)
    models        models/, and the package's __init__ (the public facade: core and models)
    applications  detection/, deploy, onnx
    train         train/
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "rsir_kernels"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
CORE, MODELS, APPLICATIONS, TRAIN = range(4)
LAYER_NAMES = ("core", "models", "applications", "train")
LAYERS = {"__init__": MODELS, "models": MODELS, "detection": APPLICATIONS, "deploy": APPLICATIONS,
          "onnx": APPLICATIONS, "train": TRAIN}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under rsir_kernels/ (a package is its __init__)."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _targets(node: ast.AST, module: str, is_package: bool, modules: dict) -> list[str]:
    """The rsir_kernels modules an import statement loads (from X import name: X.name when it
    is a module, else X)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    if base.split(".")[0] != PACKAGE:
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def _unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to; the package itself is "__init__"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges() -> list[tuple[str, str, str]]:
    """(importing module, imported module, "file:line: statement") for every import in the package."""
    modules, edges = _modules(), []
    for module, path in sorted(modules.items()):
        text = path.read_text()
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                where = f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.get_source_segment(text, node)}"
                edges += [(module, target, where) for target in
                          _targets(node, module, path.name == "__init__.py", modules) if target != module]
    return edges


def _layer(module: str) -> int:
    return LAYERS.get(_unit(module), CORE)


def test_the_graph_is_read():
    """The parser sees the imports this test is about (a broken parser would pass everything)."""
    edges = {(a, b) for a, b, _ in _edges()}
    assert (f"{PACKAGE}.models.rsir", f"{PACKAGE}.modules") in edges
    assert (f"{PACKAGE}.train.run", f"{PACKAGE}.train.build") in edges
    assert (f"{PACKAGE}.models.checkpoint", f"{PACKAGE}.checkpoint_format") in edges
    assert any(a.startswith(f"{PACKAGE}.backends.") and b == f"{PACKAGE}.reference" for a, b in edges)


def test_no_import_points_up_a_layer():
    upward = [f"{where}  ({LAYER_NAMES[_layer(a)]} -> {LAYER_NAMES[_layer(b)]})"
              for a, b, where in _edges() if _layer(b) > _layer(a)]
    assert not upward, "imports up a layer (core < models < applications < train):\n" + "\n".join(upward)


def test_models_import_nothing_from_train_and_the_core_neither():
    """Spelled out, the two arrows issue 29 removed: models/ -> train/, the core -> models/ or train/."""
    bad = [where for a, b, where in _edges() if _unit(b) == "train" and _unit(a) != "train"
           or _unit(b) in ("models", "train") and _layer(a) == CORE]
    assert not bad, "\n".join(bad)


def _assert_acyclic(graph: dict[str, dict[str, str]], what: str) -> None:
    """graph: node -> {node it imports: "file:line: statement"}; fails naming a cycle's edges."""
    state, stack = {}, []

    def visit(node):  # depth-first; a node met again while on the stack closes a cycle
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError(f"import cycle between {what}: " + " -> ".join(cycle) + ":\n" + "\n".join(
                    graph[x][y] for x, y in zip(cycle, cycle[1:])))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_units_form_no_cycle():
    """Top-level modules and subpackages (imports within one unit are checked below)."""
    graph: dict[str, dict[str, str]] = {}
    for a, b, where in _edges():
        if _unit(a) != _unit(b):
            graph.setdefault(_unit(a), {}).setdefault(_unit(b), where)
    _assert_acyclic(graph, "units")


def test_the_modules_form_no_cycle():
    graph: dict[str, dict[str, str]] = {}
    for a, b, where in _edges():
        graph.setdefault(a, {}).setdefault(b, where)
    _assert_acyclic(graph, "modules")


def test_a_planted_cycle_is_found():
    """The check fails on a cycle (a broken walk would pass everything)."""
    graph = {"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}}
    try:
        _assert_acyclic(graph, "modules")
    except AssertionError as e:
        assert "a -> b -> c -> a" in str(e)
    else:
        raise AssertionError("the cycle a -> b -> c -> a was not found")
