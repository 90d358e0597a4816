"""The CPU core's float path on transposed scores (core/softmax.h: softmax_cols, grad_cols; issue
21): scores computed as S^T = K Q^T, each query's max and sums down its column, padding queries
(columns m .. mp) computed and dropped. Every column remainder of a vector of 16 (AVX-512), 8
(AVX2) and 4 (generic) lanes and a partial last window, in every ISA build (one process each:
the core picks its build once per process), forward and the three gradients against the float64
reference (the rule of tests/util.py), and bitwise equal on 1 and 2 threads."""
import pytest

import rsir_kernels as rk

from util import fuzz_script, run_in_cpu_build

AVAILABLE = rk.available_backends()["cpp"]
pytestmark = pytest.mark.skipif(not AVAILABLE.available, reason=f"backend 'cpp' unavailable: {AVAILABLE.reason}")

CHECK = r"""
import json, sys
sys.path.insert(0, 'tests')
import torch
import rsir_kernels as rk
from rsir_kernels.backends import cpp
from util import assert_matches_reference, make_index, make_qkv

def attend(q, k, v, index, n, scale=None):
    return rk.window_attention(q, k, v, index, n, scale=scale, backend="cpp")

checked = []
for n, length in ((1, 3), (5, 23), (16, 40), (17, 40), (31, 70), (33, 70), (49, 110)):
    for dtype, scale in ((torch.float32, None), (torch.float32, -3.0), (torch.bfloat16, None)):
        q, k, v = make_qkv(2, length, 4, 16, dtype=dtype, device="cpu", seed=n)
        index = make_index(2, length, 2, device="cpu", seed=n + 1)
        assert_matches_reference(attend, q, k, v, index, n, scale=scale)
        checked.append([n, str(dtype)])

# bitwise equal on 1 and 2 threads at a window with a partial last column vector
q, k, v = make_qkv(4, 90, 4, 16, device="cpu", requires_grad=False)
index = make_index(4, 90, 2, device="cpu")
dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attend(*leaves, index, 17)
    runs.append([out.detach(), *torch.autograd.grad(out, leaves, dout)])
assert all(torch.equal(a, b) for a, b in zip(*runs))
print(json.dumps([cpp.CPU_ISA, len(checked)]))
"""


@pytest.mark.parametrize("isa", ["avx512amx", "avx512", "avx2", "generic"])
def test_transposed_softmax_paths(isa):
    ran, count = run_in_cpu_build(CHECK, isa)
    assert count == 21, (ran, count)


STREAM_CHECK = r"""
import json, sys
sys.path.insert(0, 'tests')
import torch
import rsir_kernels as rk
from rsir_kernels.backends import cpp
from util import assert_matches_reference, make_index, make_qkv

def attend(q, k, v, index, n, scale=None):
    return rk.window_attention(q, k, v, index, n, scale=scale, backend="cpp")

q, k, v = make_qkv(4, 3136, 4, 32, dtype=getattr(torch, sys.argv[1]), device="cpu", seed=11)
index = make_index(4, 3136, 2, device="cpu", seed=12)
assert_matches_reference(attend, q, k, v, index, 49)
runs = []
for threads in (1, 2):
    torch.set_num_threads(threads)
    qkv = torch.stack([q.detach(), k.detach(), v.detach()], 2).requires_grad_()
    out = rk.window_attention_qkvpacked(qkv, index, 49, backend="cpp")
    runs.append([out.detach(), *torch.autograd.grad(out, qkv, torch.ones_like(out))])
assert all(torch.equal(a, b) for a, b in zip(*runs))
print(json.dumps(cpp.CPU_ISA))
"""


@pytest.mark.parametrize("isa,dtype", [("avx512amx", "float32"), ("avx512amx", "bfloat16"), ("avx512amx", "float16"),
                                       ("avx512", "bfloat16"), ("avx512", "float16")])
def test_streaming_stores_of_large_outputs(isa, dtype):
    """Where out (forward) and dq, dk, dv (backward) exceed a core's L2 and their rows are whole
    aligned cache lines, the AVX-512 builds write them with streaming stores and do not prefetch
    them (core/rows.h: streams; stream_rows for fp32 rows of D % 16 == 0; Staged for 2-byte
    rows, a group's heads staged first, also in core/bf16_amx.h's forward). At such a size
    (B x L x H x D = 1.6 M elements: 6.4 MB in fp32, 3.2 MB in bf16 / fp16), forward and
    gradients against the float64 reference (the rule of tests/util.py), packed and separate
    gradient buffers, and bitwise equal on 1 and 2 threads; in the AMX build and in the plain
    AVX-512 build (one process each)."""
    if not fuzz_script()._isa_runs(isa):
        pytest.skip(f"this CPU does not run the {isa} build")
    run_in_cpu_build(STREAM_CHECK, isa, dtype)
