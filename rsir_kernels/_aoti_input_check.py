"""The input check that rsir_kernels.deploy compiles into an AOTInductor package.

AOTInductor generates a check of every input (dtype, sizes, strides, device) but runs it only
when the environment has AOTI_RUNTIME_CHECK_INPUTS=1 (torch/_inductor/codegen/cpp_wrapper_cpu.py,
`generate_input_output_runtime_checks`; no Inductor config turns it on), and a static size
leaves nothing in the graph to assert on: without the variable a package fed another shape
reads the tensor as if it had the shape it was built for and answers, wrong, without an error.
`compiled_in(...)` wraps that code generator while the package compiles: the generated check
runs at every call, preceded by `images_check_source`'s, which refuses a shape the graph was not
built for with one message naming the accepted and the given shape.

What a graph holds for: each size of the input is a constant, or a * s + b for a symbol s in
the exported program's range_constraints; and torch.export's guards (`program._guards_code`,
Python expressions over the input's sizes that ExportedProgram.module() checks in Python and
AOTInductor does not) hold. Both are compiled to C++ here (`guard_to_cpp`).
"""
from __future__ import annotations

import ast
import contextlib
import re
import unittest.mock
from typing import Optional, Sequence, Union

import sympy

# The size of one input dim: a constant, or (symbol, a, b, lower, upper): a * s + b, s in [lower, upper]
DimSpec = Union[int, tuple]

_INT64_MAX = 2 ** 63 - 1
_GATE = re.compile(r"if\s*\(\s*!\s*_check_aoti_runtime_check_inputs_env\(\)\s*\)\s*\{\s*return;\s*\}")
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_ARITH = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*"}


def guard_to_cpp(guard: str) -> str:
    """A torch.export guard (Python over L[...].size()[i]) -> a C++ bool expression over s0, s1, ...

    Python's // and % round toward -inf (C++ toward 0): they become py_floordiv / py_mod, which
    set `defined` false on a zero divisor. ValueError for any construct outside this small set."""
    def cpp(node) -> str:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if abs(node.value) > _INT64_MAX:
                raise ValueError(f"guard {guard!r}: {node.value} does not fit int64")
            return f"INT64_C({node.value})"
        if isinstance(node, ast.Constant) and type(node.value) is bool:
            return "true" if node.value else "false"
        if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "size"
                and not node.value.args and isinstance(node.slice, ast.Constant)):
            return f"s{int(node.slice.value)}"
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            return f"({cpp(node.left)} {_ARITH[type(node.op)]} {cpp(node.right)})"
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mod)):
            name = "py_floordiv" if isinstance(node.op, ast.FloorDiv) else "py_mod"
            return f"{name}({cpp(node.left)}, {cpp(node.right)}, defined)"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
            return f"({'-' if isinstance(node.op, ast.USub) else '!'}{cpp(node.operand)})"
        if isinstance(node, ast.BoolOp):
            return "(" + (" && " if isinstance(node.op, ast.And) else " || ").join(map(cpp, node.values)) + ")"
        if isinstance(node, ast.Compare) and all(type(o) in _COMPARE for o in node.ops):
            sides = [node.left, *node.comparators]
            pairs = [f"({cpp(a)} {_COMPARE[type(o)]} {cpp(b)})" for a, o, b in zip(sides, node.ops, sides[1:])]
            return pairs[0] if len(pairs) == 1 else "(" + " && ".join(pairs) + ")"
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("sym_max", "sym_min") and len(node.args) == 2):
            return f"std::{node.func.attr[4:]}<int64_t>({cpp(node.args[0])}, {cpp(node.args[1])})"
        raise ValueError(f"can't compile torch.export's guard {guard!r} into the package: "
                         f"{ast.dump(node)[:80]} is not supported")

    return cpp(ast.parse(guard, mode="eval").body)


def failing_guard(guards: Sequence[str], shapes: Sequence[Sequence[int]]):
    """shape -> the first guard that fails (or can't be evaluated) for an input of that shape,
    for the shapes where one does (torch.export's guards, evaluated as ExportedProgram.module()
    evaluates them)."""
    import torch

    class Input:
        shape = ()

        def size(self):
            return self.shape

    codes = [(guard, compile(guard, "<guard>", "eval")) for guard in guards]
    the_input = Input()
    scope = {"L": _AnyKey(the_input), "torch": torch}
    failed = {}
    for shape in shapes:
        the_input.shape = tuple(shape)
        for guard, code in codes:
            try:
                if not eval(code, scope):  # noqa: S307 (torch.export's own guard expressions)
                    failed[tuple(shape)] = guard
                    break
            except ArithmeticError:
                failed[tuple(shape)] = guard
                break
    return failed


class _AnyKey(dict):
    """L[name] of a guard: the one input, whatever the forward calls it."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def __missing__(self, key):
        return self.value


def dim_spec(size, range_constraints) -> DimSpec:
    """An input dim of the exported graph as a DimSpec; ValueError if it is not a * s + b."""
    expr = size.node.expr if hasattr(size, "node") else sympy.Integer(int(size))
    if expr.is_Integer:
        return int(expr)
    if len(expr.free_symbols) != 1:
        raise ValueError(f"an input size of the exported graph is {expr}: one symbol expected")
    (symbol,) = expr.free_symbols
    a, b = expr.coeff(symbol), expr.subs(symbol, 0)
    if not (a.is_Integer and b.is_Integer and sympy.expand(expr - a * symbol - b) == 0):
        raise ValueError(f"an input size of the exported graph is {expr}: a * s + b expected")
    bounds = range_constraints[symbol]
    upper = int(bounds.upper) if bounds.upper.is_finite and bounds.upper <= _INT64_MAX else None
    return symbol, int(a), int(b), int(bounds.lower), upper


# Python's // and % on int64 (rounding toward -inf); `defined` false on a zero divisor
CPP_HELPERS = """\
static int64_t py_floordiv(int64_t a, int64_t b, bool& defined) {
    if (b == 0) { defined = false; return 0; }
    const int64_t q = a / b;
    return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}
static int64_t py_mod(int64_t a, int64_t b, bool& defined) {
    if (b == 0) { defined = false; return 0; }
    const int64_t r = a % b;
    return (r != 0 && ((r < 0) != (b < 0))) ? r + b : r;
}
"""


def images_check_source(dims: Sequence[DimSpec], guards: Sequence[str], accepted: str) -> str:
    """C++ of `rsir_check_images(input_handles)`: input 0 must have len(dims) dims, each size as
    its DimSpec gives (a dynamic one with a * s + b in range and divisible), every guard true;
    else std::runtime_error("this package takes <accepted>; got (sizes)")."""
    conditions = [f"s{i} == INT64_C({d})" if isinstance(d, int) else _dynamic_condition(i, d)
                  for i, d in enumerate(dims)]
    # a guard dividing by zero is false: `defined` is read after the guard is evaluated
    guards_cpp = "\n".join(f"        if (ok) {{ bool defined = true; const bool holds = {guard_to_cpp(g)}; "
                           f"ok = defined && holds; }}" for g in guards)
    unpack = " ".join(f"const int64_t s{i} = sizes[{i}];" for i in range(len(dims)))
    message = accepted.replace("\\", "\\\\").replace('"', '\\"')
    return f"""
// rsir_kernels.deploy: the shapes this package was built for, checked at every call
{CPP_HELPERS}AOTI_NOINLINE static void rsir_check_images(AtenTensorHandle* input_handles) {{
    int64_t dim = 0;
    int64_t* sizes = nullptr;
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_dim(input_handles[0], &dim));
    AOTI_TORCH_ERROR_CODE_CHECK(aoti_torch_get_sizes(input_handles[0], &sizes));
    bool ok = dim == {len(dims)};
    if (ok) {{
        {unpack}
        ok = {" && ".join(f"({c})" for c in conditions)};
{guards_cpp}
    }}
    if (!ok) {{
        std::string given = "(";
        for (int64_t i = 0; i < dim; ++i) given += (i ? ", " : "") + std::to_string(sizes[i]);
        throw std::runtime_error("this package takes {message}; got " + given + (dim == 1 ? ",)" : ")"));
    }}
}}
"""


def _dynamic_condition(i: int, dim: tuple) -> str:
    _, a, b, lower, upper = dim
    terms = [f"s{i} >= INT64_C({a * lower + b})"]
    if upper is not None:
        terms.append(f"s{i} <= INT64_C({a * upper + b})")
    if a != 1:
        terms.append(f"(s{i} - INT64_C({b})) % INT64_C({a}) == 0")
    return " && ".join(terms)


@contextlib.contextmanager
def compiled_in(check_source: str):
    """While active, AOTInductor packages get `check_source` and their generated input check,
    both run at every call (no environment variable). Yields a list that holds True once a
    package's check was generated; RuntimeError if torch's generated code is not as expected."""
    from torch._inductor.codegen.cpp_wrapper_cpu import CppWrapperCpu
    from torch._inductor.utils import IndentedBuffer

    class Scratch(IndentedBuffer):  # collects what the generator writes for the AOT wrapper
        def writeline_aot(self, line):
            self.writeline(line)

        def splice_aot(self, code, strip=False):
            self.splice(code, strip)

        def writeline_jit(self, line):
            pass

        def splice_jit(self, code, strip=False):
            pass

    original = CppWrapperCpu.generate_input_output_runtime_checks
    generated = []

    def generate(self):
        prefix, scratch = self.prefix, Scratch()
        self.prefix = scratch
        try:
            original(self)
        finally:
            self.prefix = prefix
        code, gates = _GATE.subn("rsir_check_images(input_handles);", scratch.getvalue())
        if gates != 1:
            raise RuntimeError("this torch's AOTInductor input-check code is not the expected one (the "
                               "AOTI_RUNTIME_CHECK_INPUTS gate not found): rsir_kernels.deploy can't compile "
                               "the input check in")
        prefix.splice_aot(check_source)  # as the generator writes: to the AOT wrapper's code
        prefix.splice_aot(code)
        generated.append(True)

    with unittest.mock.patch.object(CppWrapperCpu, "generate_input_output_runtime_checks", generate):
        yield generated
