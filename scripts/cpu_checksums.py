"""sha256 of every output of the CPU core (out, lse, dq, dk, dv) over a fixed set of inputs, on
each ISA build this machine runs: the before/after check of a change meant to keep the bits
(a refactor of csrc/kernels/cpu, a compiler flag). One subprocess per build (RSIR_CPU_ISA caps
the dispatcher's choice, made once per process), one thread.

    PYTHONPATH=. python scripts/cpu_checksums.py --json /tmp/before.json
    ... change, rebuild (make ext) ...
    PYTHONPATH=. python scripts/cpu_checksums.py --json /tmp/after.json --diff /tmp/before.json

Cases cover each path of the core: fp32 / fp16 / bf16 (float compute, column softmax) and fp64
(row softmax); D of 8 to 80 (one or several register tiles, dims padded); windows of 5 to 130
tokens (row tiles of every remainder, partial last windows, one window over all tokens); a packed
qkv, separate q / k / v, a non-unit dim stride; int32 / int64 index; G = 1, 2, H; an unchecked
index that is not a permutation (tokens unvisited, visited twice, out of range: the visits pass
and its serial rerun). The AMX bf16 path (D <= 32, N <= 64) runs where the build is picked.
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISAS = ("generic", "avx2", "avx512", "avx512amx")
DTYPES = ("float32", "float64", "float16", "bfloat16")
DIMS = (8, 16, 32, 64, 80)
WINDOWS = (5, 7, 16, 49, 64, 130)


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def runnable_isas() -> list:
    """The builds this processor runs (AMX also needs Linux's permission: the dispatcher then
    falls back to avx512, which the output's "picked" field shows)."""
    flags = _cpu_flags()
    need = {"generic": set(), "avx2": {"avx2", "fma"},
            "avx512": {"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"}}
    need["avx512amx"] = need["avx512"] | {"avx512_bf16", "amx_bf16", "amx_tile"}
    return [isa for isa in ISAS if need[isa] <= flags]


def cases():
    """[(name, settings)]: the product of dtypes, dims and windows over two layouts, and a few
    variants (strides, index dtype, groups, bad indexes) on a subset."""
    out = []
    for dtype in DTYPES:
        for D in DIMS:
            for N in WINDOWS:
                for layout in ("packed", "separate"):
                    out.append(dict(dtype=dtype, D=D, N=N, layout=layout, G=2, index="int64", bad=False))
        for D, N in ((16, 49), (32, 7), (80, 130)):
            out.append(dict(dtype=dtype, D=D, N=N, layout="dimstride", G=2, index="int64", bad=False))
            out.append(dict(dtype=dtype, D=D, N=N, layout="packed", G=1, index="int32", bad=False))
            out.append(dict(dtype=dtype, D=D, N=N, layout="separate", G=4, index="int64", bad=False))
            out.append(dict(dtype=dtype, D=D, N=N, layout="packed", G=2, index="int32", bad=True))
        out.append(dict(dtype=dtype, D=32, N=1000, layout="packed", G=2, index="int64", bad=False))  # N >= L
    return [("{dtype}-D{D}-N{N}-{layout}-G{G}-{index}".format(**c) + ("-bad" if c["bad"] else ""), c) for c in out]


def _inputs(c, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, c["dtype"])
    D, N, G, H, B = c["D"], c["N"], c["G"], 4, 2
    L = min(3 * N + N // 2 + 1, 320)  # partial last window
    if c["layout"] == "packed":
        qkv = torch.randn(B, L, 3, H, D, generator=g).to(dtype)
        q, k, v = qkv.unbind(2)
    elif c["layout"] == "separate":
        q, k, v = (torch.randn(B, L, H, D, generator=g).to(dtype) for _ in range(3))
    else:  # every other element of a wider last dim: dim stride 2
        q, k, v = (torch.randn(B, L, H, 2 * D, generator=g).to(dtype)[..., ::2] for _ in range(3))
    dout = torch.randn(B, L, H, D, generator=g).to(dtype)
    index = torch.stack([torch.stack([torch.randperm(L, generator=g) for _ in range(G)]) for _ in range(B)])
    if c["bad"]:  # group 0 of batch 0: a duplicate (one token unvisited) and an out-of-range entry
        index[0, 0, 1] = index[0, 0, 0]
        index[0, 0, 2] = L + 5
    index = index.to(getattr(torch, c["index"]))
    return q, k, v, dout, index, N


def _digest(t) -> str:
    return hashlib.sha256(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes()).hexdigest()


def child(lib):
    """Runs every case on the build this process's dispatcher picks; JSON on stdout."""
    import torch
    torch.set_num_threads(1)
    torch.ops.load_library(lib)
    result = {"picked": torch.ops.rsir_ext.cpu_isa(), "cases": {}}
    for seed, (name, c) in enumerate(cases()):
        q, k, v, dout, index, N = _inputs(c, seed)
        scale = c["D"] ** -0.5
        out, lse = torch.ops.rsir_ext.window_attention_fwd(q, k, v, index, N, scale)
        dqkv = torch.ops.rsir_ext.window_attention_bwd(dout, q, k, v, index, N, scale)
        parts = {"out": out, "lse": lse, "dq": dqkv[:, :, 0], "dk": dqkv[:, :, 1], "dv": dqkv[:, :, 2]}
        result["cases"][name] = {key: _digest(t) for key, t in parts.items()}
    json.dump(result, sys.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write {isa: {picked, cases: {case: {output: sha256}}}} here")
    ap.add_argument("--diff", help="a JSON of an earlier run: report every case whose checksum differs")
    ap.add_argument("--isa", nargs="*", help="builds to run (default: every one this CPU runs)")
    ap.add_argument("--lib", default=os.path.join(ROOT, "rsir_kernels", "librsir_ops.so"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.lib)
    results = {}
    for isa in args.isa or runnable_isas():
        env = dict(os.environ, RSIR_CPU_ISA=isa, OMP_NUM_THREADS="1")
        proc = subprocess.run([sys.executable, __file__, "--child", "--lib", args.lib], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{isa}: the child failed:\n{proc.stderr[-3000:]}")
        results[isa] = json.loads(proc.stdout)
        for name, sums in results[isa]["cases"].items():
            print(isa, name, hashlib.sha256("".join(sums.values()).encode()).hexdigest())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, sort_keys=True)
    if args.diff:
        with open(args.diff) as f:
            before = json.load(f)
        differ = 0
        for isa, res in results.items():
            old = before.get(isa, {}).get("cases", {})
            bad = [name for name, sums in res["cases"].items() if old.get(name) != sums]
            differ += len(bad)
            print(f"{isa} ({res['picked']}): {len(res['cases']) - len(bad)}/{len(res['cases'])} cases identical"
                  + (f"; differ: {', '.join(bad)}" if bad else ""))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
