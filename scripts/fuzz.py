"""Fuzz every backend against the float64 reference: random shapes, dtypes, strides, index
dtypes, magnitudes and scales, one seed per case.

    python scripts/fuzz.py --cases 10000 [--jobs 2]   # make fuzz N=10000 [JOBS=2]
    python scripts/fuzz.py --replay cpp:avx2:1234   # one failing case again, by its tag

The cases are split over the targets: `cpp` under every ISA build of the CPU core that this
machine runs (RSIR_CPU_ISA=avx512amx / avx512 / avx2 / generic, one subprocess each: the core
picks its build once per process), `reference` (fp32/fp16/bf16 against float64), and `triton`
under its interpreter on a CPU-only machine (a smaller share: ~100x slower). Each case is checked
with the project's tolerance rule (rsir_kernels.reference.tolerance_failure), given the
reference's own error level at the case's inputs (the largest over equally valid evaluations:
error_level): fp32 within max(1e-5, 2x that level) relative; fp64 within max(1e-10, 2x that
level); fp16/bf16 within 2x the same-precision reference's error plus 1e-3. Prints a
progress bar and the tag (target:isa:seed) of every failing case; exits 1 on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("avx512amx", "avx512", "avx2", "generic")
ISA_NAMES = {"avx512amx": "avx512+amx", "avx512": "avx512", "avx2": "avx2+fma", "generic": "generic"}


def draw_case(seed: int) -> dict:
    """The problem of case `seed` (a pure function of the seed)."""
    rng = random.Random(seed)
    groups = rng.choice([1, 1, 2, 3, 4])
    heads = groups * rng.choice([1, 1, 2])
    length = rng.choice([1, 2, rng.randint(3, 20), rng.randint(3, 20), rng.randint(20, 80)])
    window = rng.choice([1, rng.randint(1, 8), rng.randint(2, 64), length, length + rng.randint(1, 5)])
    dtype = rng.choices(["float32", "float64", "float16", "bfloat16"], weights=[6, 1, 2, 2])[0]
    # magnitudes: fp16 overflows past ~6e4, so low precision stays where its inputs are finite;
    # fp64 is judged against float64 itself, which at large scores is no more exact than the
    # result under test (a saturated dq of 1e-5 carries ~1e-14 of cancellation in both), so it
    # stays at magnitude and scale <= 1
    top = {"float32": 4.0, "float64": 0.0}.get(dtype, 1.5)
    magnitude = 10 ** rng.uniform(-2, top) if rng.random() < 0.4 else 1.0
    scale = None if rng.random() < 0.5 else rng.choice([1, 1, -1]) * 10 ** rng.uniform(-2, top)
    return dict(batch=rng.randint(1, 2), length=length, heads=heads, groups=groups,
                dim=rng.choice([1, 3, 8, 16, rng.randint(1, 40)]), window=max(1, window), dtype=dtype,
                layout=rng.choice(["packed", "separate", "dim-strided"]),
                index_dtype=rng.choice(["int32", "int64"]), magnitude=magnitude, scale=scale, data_seed=seed)


def make_inputs(case: dict, device: str):
    """q, k, v (B, L, H, D) in the case's layout and dtype, index (B, G, L), dout."""
    import torch
    gen = torch.Generator().manual_seed(case["data_seed"])
    dtype = getattr(torch, case["dtype"])
    b, n, h, d = case["batch"], case["length"], case["heads"], case["dim"]
    mag = case["magnitude"]
    if case["layout"] == "packed":
        base = torch.randn(b, n, 3, h, d, generator=gen)
        base[:, :, :2] *= mag
        q, k, v = (t.to(device, dtype) for t in base.unbind(2))
    elif case["layout"] == "separate":
        q, k, v = ((torch.randn(b, n, h, d, generator=gen) * s).to(device, dtype) for s in (mag, mag, 1.0))
    else:  # non-unit stride along the head dim: views of a (B, D, L, H) buffer
        q, k, v = ((torch.randn(b, d, n, h, generator=gen) * s).to(device, dtype).permute(0, 2, 3, 1)
                   for s in (mag, mag, 1.0))
    index = torch.stack([torch.stack([torch.randperm(n, generator=gen) for _ in range(case["groups"])])
                         for _ in range(b)]).to(device, getattr(torch, case["index_dtype"]))
    dout = torch.randn(b, n, h, d, generator=gen).to(device, dtype)
    return q, k, v, index, dout


def sequential_dot_attention(q, k, v, index, n, scale):
    """Window attention (B, L, H, D) as plain autograd ops, its scores q . k summed over the head
    dim one term at a time (each product and each partial sum rounded: no FMA, no blocking),
    then softmax(scores * scale) @ v: an fp32 evaluation order of its own, that of a kernel
    accumulating the dot product in a loop."""
    import torch
    from rsir_kernels import reference as ref

    idx = ref.head_index(index, q.shape[2])
    qs, ks, vs = (ref.gather_tokens(t, idx) for t in (q, k, v))
    outs = []
    for qw, kw, vw in zip(*(ref.split_windows(t, n) for t in (qs, ks, vs))):
        scores = qw[..., :, None, 0] * kw[..., None, :, 0]
        for d in range(1, q.shape[-1]):
            scores = scores + qw[..., :, None, d] * kw[..., None, :, d]
        outs.append(torch.softmax(scores * scale, dim=-1) @ vw)
    return ref.scatter_tokens(ref.merge_windows(outs), idx)


def error_level(q, k, v, index, n, scale, dout, exact, dtype=None, evaluations: int = 8) -> list:
    """The reference's own error in `dtype` (default: q's; fp16/bf16 are judged otherwise)
    against `exact` (float64 out, dq, dk, dv), per tensor: the largest over 2 x `evaluations`
    equally valid evaluations of the same math, each of which changes only the rounding.
    Evaluation t permutes the head dim of q and k (identity for t = 0) and runs q * (2t + 1)
    with the scale divided by 2t + 1 (odd multipliers round q differently; a power of two would
    change nothing, so every evaluation is a distinct draw at any D), once through the
    reference and once through sequential_dot_attention.

    One evaluation alone is a single draw: at large scores the rounding of q . k moves the
    exponents by ~|scale q . k| * 2^-24 (2^-53 in fp64), and how far that moves the result
    depends on the order of the sums; on the same inputs one order's fp32 dq was 2.7e-6 off and
    another's 1e-4 (fuzz case cpp:avx512:20112). The kernel under test is one more draw, so the
    level must be a maximum over enough distinct draws of every order fp32 code legitimately
    uses (the worst-case bound of a D-term dot product, D * 2^-24 * sum |q_d k_d|, holds for all
    of them). Two gaps, each found by 10,000 cases:
      * 4 orders x (q * 1, q * 3) were only 2 distinct draws at D = 1 and few at small D:
        cpp:avx2:5690 (D = 1, scale 176): rounding S = q k once to fp32 alone moves dk by
        4.3e-3, the cpp error; the two distinct draws moved it by 0.9e-3 and 1.3e-3.
      * torch's matmul sums in blocks with FMA, whose rounding spreads less than a sequential
        sum (the cpp core's, without FMA in its generic build): cpp:generic:7420 (D = 22,
        scale 625): the kernel's order alone gives its dk error 9.1e-4, 40 random sequential
        orders range 2.4e-4 (median) to 1.1e-3, and 32 matmul evaluations reached 3.8e-4."""
    import torch
    from rsir_kernels import reference
    from util import max_rel_error

    dtype = dtype or q.dtype
    gen = torch.Generator().manual_seed(0)
    dim = q.shape[-1]
    base = dim ** -0.5 if scale is None else scale
    level = [0.0] * 4
    for t in range(evaluations):
        perm = torch.arange(dim) if t == 0 else torch.randperm(dim, generator=gen)
        mult = 2.0 * t + 1.0
        for attend in (reference.window_attention_reference, sequential_dot_attention):
            if t == 0 and dtype == torch.float64 and attend is reference.window_attention_reference:
                continue  # that is `exact` itself
            leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
            qv, kv = (leaves[0] * mult)[..., perm], leaves[1][..., perm]
            out = attend(qv, kv, leaves[2], index, n, base / mult)
            got = (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))
            level = [max(a, max_rel_error(g, e)) for a, g, e in zip(level, got, exact)]
    return level


def check_case(backend: str, case: dict, device: str = "cpu") -> str | None:
    """None if `backend` matches the float64 reference on `case` within the rule, else why not."""
    import torch
    import rsir_kernels as rk
    from rsir_kernels import reference

    if backend == "triton" and case["dtype"] == "float64":  # triton has no fp64: the same problem in fp32
        case = dict(case, dtype="float32")
    q, k, v, index, dout = make_inputs(case, device)
    n, scale = case["window"], case["scale"]

    def grads(fn, dtype, upcast=False):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves) if fn else reference.window_attention_reference(*leaves, index, n, scale, upcast=upcast)
        return [t.detach() for t in (out, *torch.autograd.grad(out, leaves, dout.to(dtype)))]

    exact = grads(None, torch.float64, upcast=True)
    if not all(torch.isfinite(e).all() for e in exact):
        return None  # the rule covers finite float64 results
    run = lambda *t: rk.window_attention(*t, index, n, scale=scale, backend=backend)  # noqa: E731
    got = grads(run, q.dtype)
    same = grads(None, q.dtype) if q.dtype in (torch.float16, torch.bfloat16) else [None] * 4
    level = (error_level(q, k, v, index, n, scale, dout, exact) if q.dtype in (torch.float32, torch.float64)
             else [None] * 4)
    for name, a, e, r, lvl in zip(("out", "dq", "dk", "dv"), got, exact, same, level):
        why = reference.tolerance_failure(a, e, r, lvl or 0.0)
        if why:
            return f"{name}: {why}" + (f" (the reference's own error level {lvl:.3g})" if lvl else "")
    return None


def run_cases(backend: str, seeds, device: str = "cpu", report=None) -> list:
    """Checks case(seed) for each seed; returns [(seed, message)] of the failures. report(i,
    failure) is called after each case (failure None when it passed)."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    os.environ.setdefault("RSIR_POISON", "1")  # an unwritten row of a cpp output shows up as NaN
    failures = []
    for i, seed in enumerate(seeds):
        try:
            why = check_case(backend, draw_case(seed), device)
        except Exception as exc:  # noqa: BLE001  (a crash is a failing case too)
            why = f"{type(exc).__name__}: {exc}"
        if why:
            failures.append((seed, why))
        if report:
            report(i, (seed, why) if why else None)
    return failures


def _worker(args) -> None:
    """One target in this process: prints one JSON line per case."""
    import torch
    device = "cuda" if args.target == "triton" and torch.cuda.is_available() else "cpu"
    if args.target == "triton" and device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
    seeds = range(args.first_seed, args.first_seed + args.count)

    def report(i, failure):
        print(json.dumps({"done": i + 1, "fail": failure}), flush=True)

    run_cases(args.target, seeds, device, report=report)


def _plan(total: int) -> list:
    """[(target, isa or '', count)]: triton 2 %, reference 5 %, cpp the rest over the ISAs."""
    sys.path.insert(0, ROOT)
    import rsir_kernels as rk
    avail = rk.available_backends()
    plan = []
    if avail["triton"].available or _interpreter_usable():
        plan.append(("triton", "", max(1, total // 50)))
    plan.append(("reference", "", max(1, total // 20)))
    if avail["cpp"].available:
        isas = [isa for isa in ISAS if _isa_runs(isa)]
        left = total - sum(c for _, _, c in plan)
        for j, isa in enumerate(isas):
            plan.append(("cpp", isa, left // len(isas) + (j < left % len(isas))))
    return plan


def _interpreter_usable() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


def _isa_runs(isa: str) -> bool:
    """Whether this CPU runs the ISA build (RSIR_CPU_ISA only caps the dispatcher's choice)."""
    if isa == "generic":
        return True
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    avx512 = ("avx512f", "avx512bw", "avx512dq", "avx512vl")
    need = {"avx512amx": avx512 + ("avx512_bf16", "amx_tile", "amx_bf16"), "avx512": avx512,
            "avx2": ("avx2", "fma")}[isa]
    return all(f in flags for f in need)


def _bar(done: int, total: int, fails: int, start: float) -> str:
    width = 40
    filled = width * done // max(total, 1)
    rate = done / max(time.time() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} failed {fails} eta {eta:.0f}s"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=1000, help="total cases over every target")
    parser.add_argument("--seed", type=int, default=0, help="first case seed (cases use seed, seed + 1, ...)")
    parser.add_argument("--replay", help="target:isa:seed of one case (as printed for a failure)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes at once (one thread each)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--first-seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    if args.replay:
        target, isa, seed = args.replay.split(":")
        plan, args.seed = [(target, isa, 1)], int(seed)
    else:
        plan = _plan(args.cases)
    total = sum(c for _, _, c in plan)
    print("plan: " + ", ".join(f"{t}{':' + i if i else ''} {c}" for t, i, c in plan), flush=True)
    # every target gets seeds of its own: the targets run after one another's seed ranges
    firsts = [args.seed + sum(c for _, _, c in plan[:j]) for j in range(len(plan))]
    start, failures = time.time(), []
    done = [0] * len(plan)
    events = queue.Queue()

    def worker(j, target, isa, count):
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        if isa:
            env["RSIR_CPU_ISA"] = isa
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--target", target,
               "--first-seed", str(firsts[j]), "--count", str(count)]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for line in proc.stdout:
            if line.startswith("{"):
                events.put((j, json.loads(line)))
        events.put((j, {"exit": proc.wait()}))

    pending = list(enumerate(plan))
    running, last_percent = 0, -1
    while pending or running:
        while pending and running < max(1, args.jobs):
            j, (target, isa, count) = pending.pop(0)
            threading.Thread(target=worker, args=(j, target, isa, count), daemon=True).start()
            running += 1
        j, msg = events.get()
        target, isa, count = plan[j]
        if "exit" in msg:
            running -= 1
            if msg["exit"] != 0 or done[j] != count:
                failures.append(f"{target}:{isa}: worker exited {msg['exit']} after {done[j]}/{count} cases")
                sys.stderr.write(f"\n{failures[-1]}\n")
            continue
        done[j] = msg["done"]
        if msg["fail"]:
            seed, why = msg["fail"]
            failures.append(f"{target}:{isa}:{seed}")
            sys.stderr.write(f"\nFAILED {target}:{isa}:{seed}  {why}\n  replay: python scripts/fuzz.py "
                             f"--replay {target}:{isa}:{seed}\n")
        # a terminal redraws the bar in place; a log file gets a line per percent, not per case
        if sys.stderr.isatty() or sum(done) * 100 // total != last_percent:
            last_percent = sum(done) * 100 // total
            sys.stderr.write(_bar(sum(done), total, len(failures), start)
                             + ("" if sys.stderr.isatty() else "\n"))
            sys.stderr.flush()
    sys.stderr.write("\n")
    print(f"{total} cases, {len(failures)} failed, {time.time() - start:.0f} s"
          + (": " + " ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
