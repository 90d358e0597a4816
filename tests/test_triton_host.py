"""Host (Python) cost of a Triton launch and the direct launch of compiled kernels (launch.py).

On a GPU the small stages of a model are bound by host time: a launch through Triton's
`kernel[grid](...)` binds and specializes every argument and hashes a cache key per call.
launch.py computes each call's arguments once per shape (a plan) and, on CUDA, launches the
compiled kernel directly. These tests keep that glue from creeping back (CPU proxies, with the
launches stubbed) and check offline, against Triton's own argument binding for sm_90, that the
direct launch passes what Triton's launch would.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

import rsir_kernels as rk
from rsir_kernels.backends import get as get_backend
from benchmarks.common.timing import per_call_seconds  # the repository root is on the path
from util import make_index, make_qkv

if get_backend("triton").unavailable is not None:
    pytest.skip(f"triton backend unavailable: {get_backend('triton').unavailable}", allow_module_level=True)

from rsir_kernels.backends.triton import launch  # noqa: E402
from rsir_kernels.backends.triton import custom_ops, plans  # noqa: E402


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](...) does nothing."""

    def __getitem__(self, grid):
        return self

    def __call__(self, *args, **kwargs):
        return None


@pytest.fixture
def stubbed(monkeypatch):
    monkeypatch.setattr(launch, "window_attn_fwd_kernel", _NoLaunch())
    monkeypatch.setattr(launch, "window_attn_bwd_kernel", _NoLaunch())
    qkv = torch.randn(1, 49, 3, 2, 16, requires_grad=True)
    index = make_index(1, 49, 2, device="cpu")
    dout = torch.randn(1, 49, 2, 16)
    return qkv, index, dout


def _python_calls(fn) -> int:
    """Python-level function calls and C calls that fn makes (its second run: plans cached)."""
    fn()
    calls = [0]

    def profile(frame, event, arg):
        if event in ("call", "c_call"):
            calls[0] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls[0]


def test_launch_glue_call_count(stubbed):
    """launch.forward / backward: one cached plan lookup and one launch (15 and 14 calls, the
    strides, allocations and the stub included; 44 and 56 before plans)."""
    qkv, index, dout = stubbed
    q, k, v = qkv.detach().unbind(2)
    out, lse = launch.forward(q, k, v, index, 49, 0.25)
    assert _python_calls(lambda: launch.forward(q, k, v, index, 49, 0.25)) <= 16
    assert _python_calls(lambda: launch.backward(dout, q, k, v, index, 49, 0.25)) <= 15


def test_eager_call_count(stubbed):
    """The whole eager entry point (validation, backend choice, autograd, the launch glue):
    230 calls forward and 368 forward + backward when written (255 and 435 before plans); 30% slack."""
    qkv, index, dout = stubbed

    def forward():
        with torch.no_grad():
            rk.window_attention_qkvpacked(qkv, index, 49, backend="triton", check_index=False)

    def forward_backward():
        out = rk.window_attention_qkvpacked(qkv, index, 49, backend="triton", check_index=False)
        torch.autograd.grad(out, (qkv,), dout)

    assert _python_calls(forward) <= 300
    assert _python_calls(forward_backward) <= 480


def test_launch_glue_time_against_a_trivial_op(stubbed):
    """The glue of launch.forward (allocations included, launch stubbed) against a 4-element
    torch add timed in the same run, in interleaved rounds of this thread's CPU time (so time
    descheduled on a loaded host counts for neither): 2.5-4.5x when written on a loaded 2-core host; the bound,
    10x, catches the glue growing back to a per-argument loop (the binding that the direct
    launch skips cost 26 us, 3.5x the add, on that host)."""
    qkv, index, _ = stubbed
    q, k, v = qkv.detach().unbind(2)
    x = torch.randn(4)
    glue, trivial = (min(means) * 1e6 for means in per_call_seconds(
        [lambda: launch.forward(q, k, v, index, 49, 0.25), lambda: x + 1], calls=300, rounds=5, warmup=50,
        clock=time.thread_time))
    assert glue <= 10 * trivial, f"glue {glue:.1f} us vs torch add {trivial:.1f} us"


_BINDING = r"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from rsir_kernels.backends.triton import config as triton_config, kernels, launch, plans
backend = make_backend(GPUTarget("cuda", 90, 32))
binders = {fn: create_function_from_signature(fn.signature, fn.params, backend)
           for fn in (kernels.window_attn_fwd_kernel, kernels.window_attn_bwd_kernel)}
for (b, l, h, d, g, n, dtype, idx_dtype, tile) in [(2, 103, 4, 24, 2, 49, torch.bfloat16, torch.int64, None),
                                                  (1, 300, 2, 32, 1, 256, torch.float16, torch.int32, None),
                                                  (1, 40, 2, 16, 2, 20, torch.float32, torch.int64, 16)]:
    qkv = torch.randn(b, l, 3, h, d).to(dtype)
    q, k, v = qkv.unbind(2)
    index = torch.stack([torch.randperm(l) for _ in range(b * g)]).view(b, g, l).to(idx_dtype)
    out, lse = torch.empty(b, l, h, d, dtype=dtype), torch.empty(b, h, l)
    dout, dqkv = torch.randn(b, l, h, d).to(dtype), torch.empty(b, l, 3, h, d, dtype=dtype)
    stats = torch.empty(b, h, l, 2)
    config = None if tile is None else triton_config.make_config(b, l, h, g, d, n, dtype, q.device, tile=tile)
    fplan, _ = plans.forward_plan(q.shape, q.stride(), k.stride(), v.stride(), index.shape, index.stride(),
                                   out.stride(), lse.stride(), dtype, q.device, n, 0.3, config)
    bplan, _ = plans.backward_plan(q.shape, dout.stride(), q.stride(), k.stride(), v.stride(), index.shape,
                                    index.stride(), dqkv.stride(), dtype, q.device, n, 0.3, config)
    for fn, plan, tensors in ((kernels.window_attn_fwd_kernel, fplan, (q, k, v, index, out, lse)),
                              (kernels.window_attn_bwd_kernel, bplan, (dout, q, k, v, index, dqkv, stats))):
        bound, spec, _ = binders[fn](*tensors, *plan.args, **plan.constexprs)
        values = tuple(bound.values())
        assert all(a is t for a, t in zip(values, tensors)), fn
        assert values[len(tensors):] == plan.direct_tail, (fn, values[len(tensors):], plan.direct_tail)
        for name, (kind, attr) in zip(bound, spec):
            if kind == "constexpr" or kind.startswith("*") or name == "stride_il":
                continue
            assert not attr, (fn, name, kind, attr)  # neither ==1 nor %16: one kernel for every value
assert launch._direct_launch_supported()  # the installed Triton launches as the plans assume
print("ok")
"""


def test_direct_launch_arguments_match_tritons_binding():
    """The arguments a plan hands a compiled kernel directly are exactly those Triton's own
    binding gives it (checked for sm_90 offline, without TRITON_INTERPRET), and no integer or
    float argument but the index's token stride is specialized, so one compiled kernel serves
    every call with the plan's key."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", _BINDING], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,window", [(torch.bfloat16, 49), (torch.float16, 200), (torch.float32, 7)])
def test_direct_launch_is_bitwise_the_ordinary_launch(dtype, window, monkeypatch):
    """The first call of a plan goes through kernel[grid] and stores the compiled kernel; later
    calls launch it directly: forward and backward bitwise equal to the ordinary path's."""
    q, k, v = (t.detach() for t in make_qkv(2, 300, 4, 32, dtype))
    index = make_index(2, 300, 2)
    dout = torch.randn_like(q)
    scale = 0.3

    def run():
        out, lse = launch.forward(q, k, v, index, window, scale)
        return out, launch.backward(dout, q, k, v, index, window, scale), lse

    plans.forward_plan.cache_clear()
    plans.backward_plan.cache_clear()
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", False)
    ordinary = run()
    plans.forward_plan.cache_clear()
    plans.backward_plan.cache_clear()
    monkeypatch.setattr(launch, "DIRECT_LAUNCH", True)
    first, second = run(), run()
    out, _, lse = second
    plan, _ = plans.forward_plan(q.shape, q.stride(), k.stride(), v.stride(), index.shape, index.stride(),
                                  out.stride(), lse.stride(), q.dtype, q.device, window, scale, None)
    assert plan.runners, "no compiled kernel stored: the direct launch never ran"
    for a, b, c in zip(ordinary, first, second):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_op_registration_per_device():
    """Under the interpreter (CPU tensors) the ops are custom_op with register_fake: triton_op
    fails opcheck and torch.compile there (docs/design.md section 6). On CUDA: triton_op."""
    assert custom_ops.OP_KIND == ("triton_op" if torch.cuda.is_available() else "custom_op")


def test_traceable_bodies_match_the_eager_launch(monkeypatch):
    """The triton_op bodies (what Inductor traces on CUDA) compute the eager path's numbers:
    wrap_triton made the identity here, forward and backward bitwise equal to launch.forward /
    backward, on the single-tile and the multi-tile path."""
    monkeypatch.setattr(custom_ops, "wrap_triton", lambda kernel: kernel, raising=False)
    for window in (20, 129):
        q, k, v = (t.detach() for t in make_qkv(1, 130, 2, 16, torch.float16))
        index = make_index(1, 130, 2, device="cpu")
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q.dtype)
        out, lse = launch.forward(q, k, v, index, window, 0.25)
        traced_out, traced_lse = custom_ops._traceable_forward(q, k, v, index, window, 0.25)
        assert torch.equal(out, traced_out) and torch.equal(lse, traced_lse)
        assert torch.equal(launch.backward(dout, q, k, v, index, window, 0.25),
                           custom_ops._traceable_backward(dout, q, k, v, index, window, 0.25))


@pytest.mark.gpu
def test_triton_op_opcheck_and_inductor_launches_the_kernels():
    """On CUDA: opcheck of both triton_ops (fake tensors, schema; no autograd of their own), and a
    compiled call whose generated code launches window_attn_fwd_kernel itself, matching eager."""
    from torch._inductor.utils import run_and_get_code
    q, k, v = make_qkv(2, 100, 4, 16, torch.bfloat16)
    index = make_index(2, 100, 2)
    q, k, v = q.detach(), k.detach(), v.detach()  # the ops carry no autograd (the Function's job)
    torch.library.opcheck(torch.ops.rsir.window_attention_triton.default, (q, k, v, index, 49, 0.25))
    out, lse = torch.ops.rsir.window_attention_triton(q, k, v, index, 49, 0.25)
    args = (torch.randn_like(out), q, k, v, index, 49, 0.25)
    torch.library.opcheck(torch.ops.rsir.window_attention_triton_backward.default, args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v, index: rk.window_attention(q, k, v, index, 49, backend="triton"),
                             fullgraph=True)
    result, codes = run_and_get_code(compiled, q.detach(), k.detach(), v.detach(), index)
    assert any("window_attn_fwd_kernel" in code for code in codes)
    assert not any("torch.ops.rsir.window_attention_triton.default(" in code for code in codes)
    assert torch.equal(result, rk.window_attention(q.detach(), k.detach(), v.detach(), index, 49, backend="triton"))
