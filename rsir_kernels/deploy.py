"""Deployment artifacts that take any batch and refuse a shape their graph was not built for.

    import rsir_kernels.deploy
    rsir_kernels.deploy.export_aoti(model, images, "model_aoti.pt2")        # AOTInductor package
    rsir_kernels.deploy.export_program(model, images, "model_program.pt2")  # torch.export.save
    # elsewhere, with torch only (and, for the cpp backend's graphs, the ops library):
    torch.ops.load_library(ops_library_path)
    logits = torch._inductor.aoti_load_package("model_aoti.pt2")(images)     # any batch
    logits = torch.export.load("model_program.pt2").module()(images)

Both export `model` at `example_images`' channels, height and width and a dynamic batch
(B >= 1, up to `max_batch`); `dynamic_size` makes height and width dynamic too, over the sizes
it names. A call with another shape raises: the package's RuntimeError reads "this package
takes (B, 3, 64, 64) with B >= 1; got (1, 3, 96, 96)" and comes from a check compiled into
the package (rsir_kernels._aoti_input_check says why torch's own needs help); the program's
module() checks its inputs in Python (torch's message names the dim).
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence, Union

import torch

from . import _aoti_input_check as check

SizeRange = Union[range, Sequence[range]]


def export_program(model: torch.nn.Module, example_images: torch.Tensor, path: Optional[str] = None, *,
                   dynamic_size: Optional[SizeRange] = None,
                   max_batch: Optional[int] = None) -> torch.export.ExportedProgram:
    """torch.export's program of `model` for images (B, C, H, W) as `example_images`, B dynamic
    (1 <= B <= max_batch, no upper bound by default), saved to `path` (torch.export.save) if given.

    dynamic_size: None for the example's H and W alone; a range of sides (H and W each any value
    in it, e.g. range(448, 1345, 224)), or (height range, width range). ValueError when the
    model's graph holds for fewer sizes than asked (it names them). The example's values are not
    used, only its shape and dtype."""
    program, _, _ = _export(model, example_images, dynamic_size, max_batch)
    if path is not None:
        torch.export.save(program, os.fspath(path))
    return program


def export_aoti(model: torch.nn.Module, example_images: torch.Tensor, package_path: str, *,
                dynamic_size: Optional[SizeRange] = None, max_batch: Optional[int] = None,
                inductor_configs: Optional[dict] = None) -> str:
    """An AOTInductor package (torch._inductor.aoti_compile_and_package) of `model`, exported as
    export_program exports it, at `package_path` (a .pt2 file); returns the path.

    The package runs a check at every call, no environment variable needed: images of a shape
    outside those exported (another channel count, H or W, B < 1 or > max_batch), or of another
    dtype, layout (strides) or device raise RuntimeError naming the accepted and the given shape.
    The check is verified here: the package is loaded and must refuse a wrong shape."""
    if not isinstance(package_path, (str, os.PathLike)) or not os.fspath(package_path).endswith(".pt2"):
        raise ValueError(f"package_path must be a path ending in .pt2, got {package_path!r}")
    if inductor_configs is not None and not isinstance(inductor_configs, dict):
        raise TypeError(f"inductor_configs must be a dict or None, got {type(inductor_configs).__name__}")
    program, dims, accepted = _export(model, example_images, dynamic_size, max_batch)
    source = check.images_check_source(dims, getattr(program, "_guards_code", []), accepted)
    configs = dict(inductor_configs or {})
    # The compiled check tests the lower bounds exactly; Inductor's own would refuse B = 1
    # (it assumes a dynamic size >= 2).
    configs.setdefault("aot_inductor.check_lowerbound", False)
    configs["aot_inductor.metadata"] = {**configs.get("aot_inductor.metadata", {}), "rsir_kernels.accepts": accepted}
    with check.compiled_in(source) as generated, torch.no_grad():
        path = torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(package_path),
                                                        inductor_configs=configs)
    if not generated:
        raise RuntimeError("AOTInductor generated no input check for this package (a cached build?)")
    _verify_refusal(path, example_images, dims)
    return path


def _export(model, example_images, dynamic_size, max_batch):
    """(the exported program, its input's DimSpecs, the accepted shapes in words) after the
    arguments are checked."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("model is in training mode: call model.eval() before exporting (a graph of the "
                         "training forward draws random RS-Win orders and keeps dropout)")
    if not isinstance(example_images, torch.Tensor):
        raise TypeError(f"example_images must be a torch.Tensor, got {type(example_images).__name__}")
    if example_images.dim() != 4 or not example_images.is_floating_point() or example_images.shape[0] < 1:
        raise ValueError(f"example_images must be a floating-point (B, C, H, W) tensor with B >= 1, got "
                         f"{example_images.dtype} of shape {tuple(example_images.shape)}")
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2):
        raise ValueError(f"max_batch must be None or an int >= 2 (the batch is dynamic), got {max_batch!r}")
    sides = _size_ranges(dynamic_size, example_images.shape[2:])
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch", min=1)
    shapes = {0: batch}
    for axis, name, side in ((2, "height", sides[0]), (3, "width", sides[1])):
        if len(side) > 1:  # side = step * s + offset with s >= 2: no 0/1 specialization of s
            shapes[axis] = side.step * torch.export.Dim(name, min=2, max=len(side) + 1) + (side.start - 2 * side.step)
    # any batch: trace with two images (a batch of one would be specialized); the values are unused
    trace = example_images.expand(max(2, example_images.shape[0]), -1, -1, -1).contiguous()
    try:
        with torch.no_grad():
            program = torch.export.export(model, (trace,), dynamic_shapes=(shapes,))
    except torch._dynamo.exc.UserError as exc:
        if dynamic_size is None:
            raise
        raise ValueError(f"dynamic_size={dynamic_size!r}: the model's graph is not dynamic over these sizes "
                         f"({str(exc).splitlines()[0]})") from exc
    accepted = _describe(example_images.shape[1], sides, max_batch)
    dims = [check.dim_spec(size, program.range_constraints) for size in _user_input(program).meta["val"].shape]
    if _describe_dims(dims) != accepted:  # the graph holds for fewer sizes than asked
        raise ValueError(f"the exported graph takes {_describe_dims(dims)}, not {accepted} as asked "
                         f"(dynamic_size={dynamic_size!r}, max_batch={max_batch!r})")
    _check_guards_over(program, example_images.shape[1], sides, max_batch, dynamic_size)
    return program, dims, accepted


def _size_ranges(dynamic_size, example_size) -> tuple[range, range]:
    """(height range, width range); each holds the example's side."""
    if dynamic_size is None:
        return range(example_size[0], example_size[0] + 1), range(example_size[1], example_size[1] + 1)
    pair = (dynamic_size, dynamic_size) if isinstance(dynamic_size, range) else tuple(dynamic_size)
    if len(pair) != 2 or not all(isinstance(r, range) and len(r) and r.step > 0 and r.start >= 1 for r in pair):
        raise ValueError(f"dynamic_size must be None, a non-empty increasing range of sides >= 1, or a pair "
                         f"(height range, width range), got {dynamic_size!r}")
    for name, side, size in zip(("height", "width"), pair, example_size):
        if size not in side:
            raise ValueError(f"dynamic_size={dynamic_size!r} must hold example_images' {name} {size}")
    return pair


def _describe(channels: int, sides: tuple[range, range], max_batch: Optional[int]) -> str:
    """'(B, 3, 64, 64) with B >= 1' and the like: the shapes a graph accepts."""
    dims = [("batch", 1, 0, 1, max_batch), channels]
    for side in sides:
        dims.append(side.start if len(side) == 1 else ("side", side.step, side.start - 2 * side.step, 2, len(side) + 1))
    return _describe_dims(dims)


def _describe_dims(dims: Sequence[check.DimSpec]) -> str:
    names = "BCHW" if len(dims) == 4 else [f"d{i}" for i in range(len(dims))]
    shape = ", ".join(str(d) if isinstance(d, int) else names[i] for i, d in enumerate(dims))
    ranges = []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            continue
        _, a, b, lower, upper = d
        first = a * lower + b
        if upper is None:
            ranges.append(f"{names[i]} >= {first}" + (f" in steps of {a}" if a != 1 else ""))
        else:
            ranges.append(f"{names[i]} in {first}..{a * upper + b}" + (f" in steps of {a}" if a != 1 else ""))
    return f"({shape})" + (" with " + ", ".join(ranges) if ranges else "")


def _check_guards_over(program, channels, sides, max_batch, dynamic_size):
    """ValueError naming the shapes asked for that one of torch.export's guards excludes."""
    guards = getattr(program, "_guards_code", [])
    if not guards:
        return
    batches = sorted({1, 2} | ({max_batch} if max_batch else set()))
    failed = check.failing_guard(guards, [(b, channels, h, w) for h in sides[0] for w in sides[1] for b in batches])
    if failed:
        sizes = list(dict.fromkeys(shape[2:] for shape in failed))
        raise ValueError(f"dynamic_size={dynamic_size!r}, max_batch={max_batch!r}: the model's graph does not "
                         f"hold for (H, W) in {sizes[:8]}{' ...' if len(sizes) > 8 else ''} ({len(sizes)} of "
                         f"{len(sides[0]) * len(sides[1])} sizes; torch.export's guard "
                         f"{next(iter(failed.values()))!r} fails): export with sizes that exclude them")


def _user_input(program) -> torch.fx.Node:
    names = program.graph_signature.user_inputs
    if len(names) != 1:
        raise ValueError(f"the model's forward must take one tensor (the images), its graph takes {len(names)}")
    return next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == names[0])


def _verify_refusal(path: str, example_images: torch.Tensor, dims: Sequence[check.DimSpec]):
    """Loads the package and feeds it a height it does not take: it must raise the check's error."""
    height = dims[2]
    taken = (lambda h: h == height) if isinstance(height, int) else (
        lambda h: h >= height[1] * height[3] + height[2] and (h - height[2]) % height[1] == 0
        and (height[4] is None or h <= height[1] * height[4] + height[2]))
    wrong = next(h for h in range(1, 1 << 20) if not taken(h))
    images = example_images.new_zeros(1, example_images.shape[1], wrong, example_images.shape[3])
    package = torch._inductor.aoti_load_package(path)
    try:
        with _quiet_stderr(), torch.no_grad():
            package(images)
    except RuntimeError as exc:
        if "this package takes" in str(exc):
            return
        raise RuntimeError(f"the package refused images of shape {tuple(images.shape)} with another error "
                           f"than its input check's: {exc}") from exc
    raise RuntimeError(f"the package took images of shape {tuple(images.shape)}: its input check is not in")


@contextlib.contextmanager
def _quiet_stderr():
    """AOTInductor's runtime also prints the error it raises on stderr (fd 2): silenced here."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
