"""A whole training step of a small RSIR model under CUDA graphs (GPU only: every test is marked).

What must hold for a captured step: RS-Win draws fresh windows at every replay (torch.rand's
philox offset advances per replay once the graph registers the generator; argsort and the
window layout run on the device with no host sync), the index check is skipped while capturing
(RSIRAttention skips it anyway), and the Triton launches were compiled and planned during the
warm-up (launch.py: a replay reruns the captured launches, nothing on the host).

Each replay is checked against eager: the RS-Win orders the graph drew are copied, inside the
graph, into buffers allocated during warm-up; an eager twin with the same weights, fed those
orders, must give the same loss and gradients.
"""
import copy

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels.modules import RSIRAttention
from util import fix_ir_order, max_rel_error

pytestmark = pytest.mark.gpu

IMAGE, BATCH, CLASSES = 128, 2, 10


def _small_model():
    """Four stages (32x32 .. 4x4 tokens at 128 px, window 7: plain runs of 49, one window),
    one block each, fp32, the Triton backend."""
    return rk.models.rsir_micro(depths=(1, 1, 1, 1), num_classes=CLASSES, backend="triton").cuda()


class _OrderRecorder:
    """Patches RSIRAttention.rs_order: the model's draws are copied into per-module buffers
    (allocated at the first, eager, call; the copy is captured with the graph), and the twin's
    modules return the recorded orders instead of drawing."""

    def __init__(self, monkeypatch, model, twin):
        self.names = {m: n for n, m in model.named_modules() if isinstance(m, RSIRAttention)}
        self.twin_names = {m: n for n, m in twin.named_modules() if isinstance(m, RSIRAttention)}
        self.recorded = {}
        draw = RSIRAttention.rs_order
        recorder = self

        def rs_order(module, batch, height, width, device):
            if module in recorder.twin_names:
                return recorder.recorded[recorder.twin_names[module]].clone()
            order = draw(module, batch, height, width, device)
            name = recorder.names[module]
            if name not in recorder.recorded:
                recorder.recorded[name] = torch.empty_like(order)
            recorder.recorded[name].copy_(order)
            return order

        monkeypatch.setattr(RSIRAttention, "rs_order", rs_order)

    def snapshot(self):
        return {name: order.clone() for name, order in self.recorded.items()}


def _eager_step(twin, weights, x, y):
    """Loss and gradients of the eager twin at `weights`, with the recorded orders."""
    twin.load_state_dict(weights)
    twin.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(twin(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in twin.named_parameters()}


def _assert_permutations(orders):
    for name, order in orders.items():
        length = order.shape[-1]
        expected = torch.arange(length, device=order.device).expand_as(order)
        assert torch.equal(order.sort(dim=-1).values, expected), name


def test_manual_graph_capture_of_a_training_step(monkeypatch):
    torch.manual_seed(0)
    model = _small_model()
    twin = copy.deepcopy(model)
    recorder = _OrderRecorder(monkeypatch, model, twin)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    static_x = torch.randn(BATCH, 3, IMAGE, IMAGE, device="cuda")
    static_y = torch.randint(0, CLASSES, (BATCH,), device="cuda")

    def step():
        loss = torch.nn.functional.cross_entropy(model(static_x), static_y)
        loss.backward()
        optimizer.step()
        return loss

    side = torch.cuda.Stream()  # warm-up on a side stream (PyTorch's recipe): kernels compiled,
    side.wait_stream(torch.cuda.current_stream())  # launch plans made, optimizer state created
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    previous = None
    for replay in range(4):
        static_x.copy_(torch.randn_like(static_x))
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        graph.replay()
        torch.cuda.synchronize()
        orders = recorder.snapshot()
        _assert_permutations(orders)
        if previous is not None:  # fresh windows at every replay
            assert all(not torch.equal(orders[n], previous[n]) for n in orders), replay
        previous = orders
        loss, grads = _eager_step(twin, weights, static_x, static_y)
        assert max_rel_error(static_loss, loss) < 1e-5, replay
        for name, param in model.named_parameters():
            assert max_rel_error(param.grad, grads[name]) < 1e-5, (replay, name)


def test_compiled_reduce_overhead_training(monkeypatch):
    """torch.compile(mode="reduce-overhead") (CUDA graphs through Inductor's cudagraph trees,
    the Triton kernels launched from Inductor's code as triton_ops) trains as eager does. With
    the same RS-Win draws (fallback_random: eager's RNG stream, reseeded before every step) and
    one fixed IR-Win order (util.fix_ir_order: compiled rounding reorders near-tied IR-Win
    scores), every step's loss and gradients, and the weights after six SGD steps, match an
    eager twin's at the fp32 rule of 1e-5 (warm-up, recording and replays alike). Fresh draws
    at every replay: test_manual_graph_capture_of_a_training_step."""
    import torch._inductor.config as inductor_config
    fix_ir_order(monkeypatch)
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = _small_model()
    twin = copy.deepcopy(model)
    optimizers = {id(model): torch.optim.SGD(model.parameters(), lr=0.05),
                  id(twin): torch.optim.SGD(twin.parameters(), lr=0.05)}
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(BATCH, 3, IMAGE, IMAGE, device="cuda")
    y = torch.randint(0, CLASSES, (BATCH,), device="cuda")

    def step(net, params, seed):
        optimizer = optimizers[id(params)]
        optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in params.named_parameters()}
        optimizer.step()
        return loss.detach().clone(), grads

    with inductor_config.patch(fallback_random=True):
        for seed in range(6):
            torch.compiler.cudagraph_mark_step_begin()
            loss, grads = step(compiled, model, seed)
            eager_loss, eager_grads = step(twin, twin, seed)
            assert max_rel_error(loss, eager_loss) <= 1e-5, seed
            for name, grad in grads.items():
                assert max_rel_error(grad, eager_grads[name]) <= 1e-5, (seed, name)
    for (name, param), twin_param in zip(model.named_parameters(), twin.parameters()):
        assert max_rel_error(param, twin_param) <= 1e-5, name
