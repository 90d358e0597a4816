"""ONNX export (rsir_kernels.onnx) run by onnxruntime: the op alone against the float64
reference at the project's tolerance (partial windows, G = 1, 2, H, fp32 and fp16), and
rsir_micro exported with a dynamic batch against eager.

IR-Win sorts tokens by a channel mean that onnxruntime rounds differently from torch, so
near-ties may fall into other windows: the model's logits are compared by top-1, and by value
with every head RS-Win (no data-dependent order).
"""
import pytest
import torch

import rsir_kernels as rk
from rsir_kernels import models, reference

from util import assert_close_to, make_index

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
rk_onnx = pytest.importorskip("rsir_kernels.onnx")

BACKENDS = [b for b in ("cpp", "reference") if rk.available_backends()[b].available]


class Attention(torch.nn.Module):
    def __init__(self, window_size, backend, packed):
        super().__init__()
        self.window_size, self.backend, self.packed = window_size, backend, packed

    def forward(self, qkv, index):
        if self.packed:
            return rk.window_attention_qkvpacked(qkv, index, self.window_size, backend=self.backend)
        return rk.window_attention(*qkv.unbind(2), index, self.window_size, backend=self.backend)


def run_onnx(module, inputs, dynamic_shapes=None):
    """torch.onnx.export with this package's table, then one onnxruntime run on `inputs`."""
    program = torch.onnx.export(module, inputs, dynamo=True, verbose=False, dynamic_shapes=dynamic_shapes,
                                custom_translation_table=rk_onnx.translation_table())
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {arg.name: t.numpy() for arg, t in zip(session.get_inputs(), inputs)}
    return session, [torch.from_numpy(o) for o in session.run(None, feed)]


# (B, L, H, D, G, N): partial last windows, one window, windows of one token, G = 1, 2, H
SHAPES = [(2, 50, 4, 8, 2, 7), (1, 49, 2, 16, 1, 49), (2, 64, 4, 8, 4, 16), (3, 30, 6, 4, 2, 4),
          (2, 9, 2, 4, 2, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ["packed"] + BACKENDS)
def test_op_matches_reference(shape, route):
    batch, length, heads, dim, groups, window = shape
    qkv = torch.randn(batch, length, 3, heads, dim, generator=torch.Generator().manual_seed(0))
    index = make_index(batch, length, groups, device="cpu")
    module = Attention(window, "auto" if route == "packed" else route, route == "packed").eval()
    _, (out,) = run_onnx(module, (qkv, index))
    exact = reference.window_attention_reference(*qkv.double().unbind(2), index, window)
    assert_close_to(out, exact, name=route)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_op_low_precision(dtype):
    batch, length, heads, dim, groups, window = SHAPES[0]
    qkv = torch.randn(batch, length, 3, heads, dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    index = make_index(batch, length, groups, device="cpu")
    try:
        _, (out,) = run_onnx(Attention(window, BACKENDS[0], False).eval(), (qkv, index))
    except Exception as exc:  # noqa: BLE001  (numpy has no bfloat16; onnxruntime may lack a kernel)
        if dtype == torch.bfloat16:
            pytest.skip(f"bfloat16 does not run here: {type(exc).__name__}: {str(exc)[:200]}")
        raise
    q, k, v = qkv.unbind(2)
    exact = reference.window_attention_reference(*(t.double() for t in (q, k, v)), index, window)
    low = reference.window_attention_reference(q, k, v, index, window, upcast=False)
    assert out.dtype == dtype
    assert_close_to(out, exact, low, name=str(dtype))


def test_stable_sort_is_torch_argsort_with_ties():
    class Argsort(torch.nn.Module):
        def forward(self, x):
            return torch.argsort(x, dim=-1, stable=True)

    x = torch.randint(0, 4, (3, 40)).float()  # many ties
    _, (order,) = run_onnx(Argsort().eval(), (x,))
    assert torch.equal(order, torch.argsort(x, dim=-1, stable=True))


@pytest.fixture(scope="module")
def micro():
    torch.manual_seed(0)
    return models.rsir_micro(num_classes=10, backend=BACKENDS[0]).eval()


def _images(batch, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_rsir_micro_dynamic_batch_top1_equals_eager(micro):
    session, _ = run_onnx(micro, (_images(2),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    images = _images(16)
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        eager = micro(images)
    assert logits.shape == eager.shape
    assert torch.equal(logits.argmax(-1), eager.argmax(-1))


def test_rsir_micro_all_heads_rs_win_equals_eager():
    torch.manual_seed(0)
    model = models.rsir_micro(num_classes=10, backend=BACKENDS[0], rs_heads=models.RSIR_MICRO.num_heads).eval()
    images = _images(4)  # fixed orders only: no data-dependent sort
    _, (logits,) = run_onnx(model, (images,))
    with torch.no_grad():
        eager = model(images)
    assert (logits - eager).abs().max() <= 1e-4 * eager.abs().max()
