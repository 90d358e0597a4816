"""What torch.compile and torch.export graphs of RSIRAttention and rsir_tiny hold: the chosen
backend's registered ops and no other op of this package (no Python-only wrapper, no
autograd.Function left as a higher-order op), so that an exported model with backend cpp
needs only torch and the extension library to run."""
import pytest
import torch
from torch._dynamo.backends.common import aot_autograd

import rsir_kernels as rk
from rsir_kernels import backends, models

# backend -> (forward op, backward op) as graphs name them
OPS = {name: (backends.get(name).forward_op, backends.get(name).backward_op) for name in backends.names()}
OUR_NAMESPACES = ("rsir", "rsir_ext")


def _ours(gm: torch.fx.GraphModule) -> set:
    """The "namespace::name" of every op of this package that gm (and its subgraphs) calls;
    fails on an autograd.Function left in the graph as a higher-order op."""
    found = set()
    for module in gm.modules():
        for node in getattr(module, "graph", torch.fx.Graph()).nodes:
            if node.op != "call_function":
                continue
            assert "autograd_function" not in str(node.target), node.target
            if isinstance(node.target, torch._ops.OpOverload) and node.target.namespace in OUR_NAMESPACES:
                found.add(node.target._schema.name)
    return found


def _compiled_graphs(model, x):
    """The forward and backward graphs AOTAutograd hands to a compiler (torch.compile,
    fullgraph=True), after one training step."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep))
    compiled(x).square().sum().backward()
    return graphs


def _skip_unavailable(backend):  # every test here runs on CPU tensors but the last
    if backends.get(backend).unavailable is not None:
        pytest.skip(f"{backend}: {backends.get(backend).unavailable}")


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_compiled_and_exported_attention_hold_the_backends_ops(backend):
    """On CPU tensors (triton: under its interpreter, where its ops are custom_ops; on CUDA they
    are triton_ops, which tracing opens up for Inductor: the next test)."""
    _skip_unavailable(backend)
    reason = backends.get(backend).cannot_run(torch.empty(2, 196, 4, 8), 49)
    if reason:
        pytest.skip(reason)
    torch.manual_seed(0)
    module = rk.RSIRAttention(32, 4, backend=backend)
    x = torch.randn(2, 14, 14, 32, requires_grad=True)
    forward, backward = _compiled_graphs(module, x)
    assert _ours(forward) == {OPS[backend][0]} and _ours(backward) == {OPS[backend][1]}
    exported = torch.export.export(module.eval(), (x.detach(),))
    assert _ours(exported.graph_module) == {OPS[backend][0]}


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_compiled_and_exported_rsir_tiny_hold_the_backends_ops(backend):
    _skip_unavailable(backend)
    torch.manual_seed(0)
    model = models.rsir_tiny(depths=(1, 1, 1, 1), num_classes=10, backend=backend)
    images = torch.randn(2, 3, 64, 64)
    forward, backward = _compiled_graphs(model, images)
    assert _ours(forward) == {OPS[backend][0]} and _ours(backward) == {OPS[backend][1]}
    exported = torch.export.export(model.eval(), (images,))
    assert _ours(exported.graph_module) == {OPS[backend][0]}


@pytest.mark.gpu
def test_compiled_model_launches_the_triton_kernels_from_inductors_code():
    """On CUDA the Triton ops are triton_ops: Inductor's generated code for a compiled model's
    training step (forward and backward) launches both kernels itself."""
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    model = models.rsir_micro(num_classes=10, backend="triton").cuda()
    images = torch.randn(2, 3, 64, 64, device="cuda")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    _, codes = run_and_get_code(lambda: compiled(images).square().sum().backward())
    code = "\n".join(codes)
    assert "window_attn_fwd_kernel" in code and "window_attn_bwd_kernel" in code
