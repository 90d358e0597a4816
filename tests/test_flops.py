"""The attention's multiply-adds in fvcore's count (rsir_kernels.flops), against a hand count."""
import logging

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import rsir_kernels as rk
from rsir_kernels import models
from rsir_kernels.flops import fvcore_handles

fvcore_nn = pytest.importorskip("fvcore.nn")
logging.getLogger("fvcore").setLevel(logging.ERROR)  # its warnings name the elementwise ops it skips

# rsir_micro at 64 x 64: stages of 16x16, 8x8, 4x4, 2x2 tokens, C = 32, 64, 128, 256, 1, 1, 2, 1
# blocks, windows of min(49, L) tokens; 2 * L * N * C multiply-adds per layer (q k^T, P v)
MICRO_64_ATTENTION_MACS = (2 * 256 * 49 * 32 + 2 * 64 * 49 * 64 + 2 * (2 * 16 * 16 * 128) + 2 * 4 * 4 * 256)


def _count(model, *inputs):
    count = fvcore_nn.FlopCountAnalysis(model, inputs).set_op_handle(**fvcore_handles())
    count.unsupported_ops_warnings(False)
    count.uncalled_modules_warnings(False)
    return count


def test_model_count_includes_the_attention():
    model = models.rsir_micro(num_classes=10).eval()
    count = _count(model, torch.randn(1, 3, 64, 64))
    attention = sum(n for op, n in count.by_operator().items() if "window_attention" in op)
    assert attention == MICRO_64_ATTENTION_MACS == 1_343_488
    assert not [op for op in count.unsupported_ops() if "window_attention" in op]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # torch's counter: FLOPs = 2 x MACs
        model(torch.randn(1, 3, 64, 64))
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "window_attention" in str(op))
    assert flops == 2 * MICRO_64_ATTENTION_MACS


@pytest.mark.parametrize("backend", [b for b in ("cpp", "reference") if rk.available_backends()[b].available])
def test_backend_forward_op_counts_a_partial_window_as_full(backend):
    class Attention(torch.nn.Module):
        def forward(self, q, k, v, index):
            return rk.window_attention(q, k, v, index, 7, backend=backend)

    q = torch.randn(2, 50, 4, 8)  # 8 windows, the last one partial (counted as full)
    index = torch.stack([torch.randperm(50) for _ in range(4)]).view(2, 2, 50)
    assert _count(Attention(), q, q, q, index).total() == 2 * 2 * 50 * 4 * 7 * 8
