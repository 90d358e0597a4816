"""The bf16 forward on AMX tiles (csrc/kernels/cpu/core/bf16_amx.h), on CPUs that have AMX-BF16
and where Linux grants the tile state: S^T = K Q^T and O^T = V^T P^T as TDPBF16PS with e rounded
to bf16 for P V. Against the float64 reference by the bf16 rule (2x the error of the bf16
reference, which rounds P to bf16 too), over the shapes the tile code pads: every head dim up
to the tile limit of 32 and past it (the widened path), windows up to 64 tokens and past it,
odd and even window fills, a partial last window, int32 indices, a non-unit dim stride, an output large enough for streaming stores; bitwise
equal on 1 and 2 threads; and the error against
the widened path's (RSIR_CPU_ISA=avx512: P not rounded) on the RSIR-T stage shapes.

One process per ISA build (the core picks its build once per process)."""
import pytest

import rsir_kernels as rk

from util import run_in_cpu_build

AVAILABLE = rk.available_backends()["cpp"]
pytestmark = pytest.mark.skipif(not AVAILABLE.available, reason=f"backend 'cpp' unavailable: {AVAILABLE.reason}")

CHECK = r"""
import json, sys
sys.path.insert(0, 'tests')
import torch
import rsir_kernels as rk
from rsir_kernels import reference
from rsir_kernels.backends import cpp
from util import assert_close_to, make_index, make_qkv

def forward_errors(q, k, v, index, n, scale=None):
    '''cpp's bf16 forward against float64 (the bf16 rule), and (error, bf16 reference's error).'''
    out = rk.window_attention(q, k, v, index, n, scale=scale, backend="cpp")
    exact = reference.window_attention_reference(*(t.double() for t in (q, k, v)), index, n, scale)
    low = reference.window_attention_reference(q, k, v, index, n, scale, upcast=False)
    assert_close_to(out, exact, low, f"out n={n} D={q.shape[-1]}")
    return float((out.double() - exact).abs().max()), float((low.double() - exact).abs().max())

checked = 0
# head dims across the pair and tile padding (33: beyond the tiles, the widened path)
for dim in (1, 2, 7, 15, 16, 17, 31, 32, 33):
    q, k, v = make_qkv(2, 70, 4, dim, dtype=torch.bfloat16, device="cpu", seed=dim)
    forward_errors(q, k, v, make_index(2, 70, 2, device="cpu", seed=dim + 1), 23)
    checked += 1
# windows: one token, odd and even fills, a partial last window, 32 / 33 / 64 keys (one or two
# key blocks), 65 (beyond the tiles), one window longer than L
for n, length in ((1, 5), (2, 9), (5, 23), (32, 70), (33, 70), (49, 110), (64, 150), (65, 150), (80, 60)):
    q, k, v = make_qkv(1, length, 2, 16, dtype=torch.bfloat16, device="cpu", seed=n)
    forward_errors(q, k, v, make_index(1, length, 1, device="cpu", seed=n + 1), n, scale=0.7)
    checked += 1
# an int32 index, G = H
q, k, v = make_qkv(2, 40, 2, 16, dtype=torch.bfloat16, device="cpu", seed=3)
forward_errors(q, k, v, make_index(2, 40, 2, device="cpu", seed=4, dtype=torch.int32), 13)
checked += 1
# a non-unit dim stride (q, k, v as transposed views)
base = torch.randn(2, 3, 16, 60, 2, generator=torch.Generator().manual_seed(5)).bfloat16()
q, k, v = (base[:, i].permute(0, 2, 3, 1) for i in range(3))  # (B, L, H, D), dim stride 120
assert q.stride(-1) != 1
forward_errors(q, k, v, make_index(2, 60, 1, device="cpu", seed=6), 17)
checked += 1

# bitwise equal on 1 and 2 threads; the second shape's out (3.2 MB) exceeds a core's L2: its rows
# are staged and written with streaming stores (core/bf16_amx.h: streams)
for batch, length in ((4, 98), (8, 3136)):
    q, k, v = make_qkv(batch, length, 4, 16, dtype=torch.bfloat16, device="cpu", requires_grad=False, seed=8)
    index = make_index(batch, length, 2, device="cpu", seed=9)
    runs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        runs.append(rk.window_attention(q, k, v, index, 49, backend="cpp"))
    assert torch.equal(*runs)
forward_errors(q, k, v, index, 49)
checked += 1

# the RSIR-T stage shapes: errors against float64, for the table in docs/performance.md
stages = {}
for name, length, heads, dim in (("s1", 3136, 4, 16), ("s2", 784, 4, 32), ("s3", 196, 8, 32), ("s4", 49, 16, 32)):
    q, k, v = make_qkv(2, length, heads, dim, dtype=torch.bfloat16, device="cpu", requires_grad=False, seed=length)
    stages[name] = forward_errors(q, k, v, make_index(2, length, 2, device="cpu", seed=heads), 49)
print(json.dumps([cpp.CPU_ISA, checked, stages]))
"""


def test_amx_bf16_forward_within_the_bf16_rule():
    ran, checked, amx = run_in_cpu_build(CHECK, "avx512amx")
    if ran != "avx512+amx":
        pytest.skip(f"this CPU or kernel does not run the AMX build ({ran} ran)")
    assert checked == 21
    ran, _, widened = run_in_cpu_build(CHECK, "avx512")
    # P rounded to bf16 costs accuracy, but stays within half the rule's 2x on RSIR-T's shapes
    for stage, (err, ref_err) in amx.items():
        assert err <= ref_err, (stage, err, ref_err, widened[stage])
