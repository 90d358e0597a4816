"""Measurement of bench_model.py: which backends can run the model, and per backend the logits
check against `reference`, the bytes saved for backward, a timed training step and a timed
inference forward (eager), and a timed training step of the model under torch.compile
(mode "compile": Inductor's default; "reduce-overhead": Inductor + CUDA graphs)."""
from __future__ import annotations

import time

import torch
from torch import nn

from . import measure
from rsir_kernels import backends
from rsir_kernels.models import rsir_base, rsir_tiny
from rsir_kernels.modules import RSIRAttention


def attention_inputs(model_name: str, image: int, device, dtype):
    """One q-like tensor per stage, to ask each backend whether it can run the model."""
    model_fn = {"tiny": rsir_tiny, "base": rsir_base}[model_name]
    config = model_fn().config
    out = []
    for i, (dim, heads) in enumerate(zip(config.stage_dims(), config.num_heads)):
        side = image // (4 * 2 ** i)
        out.append(torch.empty(1, side * side, heads, dim // heads, device=device, dtype=dtype))
    return out, config.window_size ** 2


def select_backends(requested, qs, window_size):
    chosen, skipped = [], {}
    for name in backends.names():
        if requested is not None and name not in requested:
            continue
        b = backends.get(name)
        reason = b.unavailable or next((r for r in (b.cannot_run(q, window_size) for q in qs) if r), None)
        if reason is None and "triton" in name and qs[0].device.type == "cpu":
            import os
            if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                reason = "TRITON_INTERPRET=1: the interpreter is never benchmarked"
        (skipped.__setitem__(name, reason) if reason else chosen.append(name))
    return chosen, skipped


MODES = ("eager", "compile", "reduce-overhead")


def resolve_modes(requested: list, device: torch.device) -> tuple[list, dict]:
    """The modes to time on `device` in the order of MODES, and {mode: why not} for the others
    requested: reduce-overhead records CUDA graphs, which need a CUDA device."""
    unknown = [m for m in requested if m not in MODES]
    if unknown:
        raise ValueError(f"--modes: unknown mode(s) {', '.join(unknown)}; expected some of {', '.join(MODES)}")
    chosen, skipped = [], {}
    for mode in MODES:
        if mode not in requested:
            continue
        if mode == "reduce-overhead" and device.type != "cuda":
            skipped[mode] = "CUDA graphs need a CUDA device"
        else:
            chosen.append(mode)
    return chosen, skipped


def build(model_name, backend, device, seed, recompute_qkv=False, seeded_generator=True):
    """The same weights for every backend, and RS-Win draws from a generator seeded alike, or
    (seeded_generator=False, for torch.compile, which cannot trace a draw from an explicit
    generator) from torch's global RNG."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed) if seeded_generator else None
    model_fn = {"tiny": rsir_tiny, "base": rsir_base}[model_name]
    return model_fn(backend=backend, generator=generator, recompute_qkv=recompute_qkv).to(device), generator


def bench_backend(name, args, device, dtype, images, labels, timer, progress) -> dict:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    row = {"backend": name, "mode": "eager"}
    model, generator = build(args.model, name, device, args.seed, args.recompute_qkv)
    batch = images.shape[0]

    # correctness: logits vs the reference backend, same weights, same token orders. The
    # orders are recorded in the reference run and replayed: IR-Win sorts tokens by their
    # channel mean, so rounding differences of a few ulps between backends could otherwise
    # swap near-tied tokens between windows and change the logits for no fault of the kernel.
    model.eval()
    attention = [m for m in model.modules() if isinstance(m, RSIRAttention)]
    orders = {id(m): [] for m in attention}
    with torch.inference_mode(), autocast:
        generator.manual_seed(args.seed + 1)
        for m in attention:
            m.backend = "reference"
            m.token_order = (lambda *a, m=m, f=m.token_order: orders[id(m)].append(f(*a)) or orders[id(m)][-1])
        expected = model(images).float()
        for m in attention:
            m.backend = name
            m.token_order = (lambda *a, it=iter(orders[id(m)]): next(it))
        logits = model(images).float()
    for m in attention:
        del m.token_order  # back to the method: fresh orders at every forward
    err = float((logits - expected).abs().max() / expected.abs().max().clamp_min(1e-30))
    # A sanity check of the whole model (bench_attn.py checks the op precisely): fp32 1e-4;
    # under bf16/fp16 autocast the backends round differently inside 22 blocks: 1e-1.
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 1e-1
    row["logits_rel_err_vs_reference"] = err
    row["check_passed"] = bool(err <= tol and torch.isfinite(logits).all())
    progress.step(f"{name} check")

    # bytes saved for backward in a training forward
    model.train()
    params = list(model.parameters())
    with autocast:
        total, activations = measure.saved_bytes(lambda x: nn.functional.cross_entropy(model(x), labels), images,
                                                 exclude=params + [images])
    row["saved_bytes_total"] = total
    row["saved_bytes_per_image"] = activations / batch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        train_step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        train_step()
        torch.cuda.synchronize()
        row["train_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["train_peak_above_start_bytes"] = row["train_peak_bytes"] - before
    row["train_step_ms"] = measure.summarize(timer(train_step))
    row["train_images_per_s"] = batch / (row["train_step_ms"]["median"] / 1e3)
    progress.step(f"{name} train")

    model.eval()

    def infer():
        with torch.inference_mode(), autocast:
            return model(images)
    row["infer_ms"] = measure.summarize(timer(infer))
    row["infer_images_per_s"] = batch / (row["infer_ms"]["median"] / 1e3)
    progress.step(f"{name} infer")
    return row


def bench_compiled(name, mode, args, device, dtype, images, labels, timer) -> dict:
    """A training step of torch.compile(model, mode=None or "reduce-overhead") with backend
    `name`: checked, then timed as in bench_backend. Call with
    torch._inductor.config.fallback_random = True (bench_model.py sets it), so that compiled
    RS-Win draws equal eager ones.

    The check: the logits of the first compiled training step against the eager model's on
    the same weights and the same draws, as a relative Frobenius norm (a few near-tied IR-Win
    tokens that rounding orders differently would move a max-norm check, not this one):
    within 1e-3 in fp32, 5e-2 under bf16/fp16 autocast. The first step's time (compilation
    included) is compile_s."""
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    row = {"backend": name, "mode": mode}
    model, _ = build(args.model, name, device, args.seed, args.recompute_qkv, seeded_generator=False)
    model.train()
    compiled = torch.compile(model, mode=None if mode == "compile" else mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        with autocast:
            logits = compiled(images)
            loss = nn.functional.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits

    with torch.no_grad(), autocast:
        torch.manual_seed(args.seed + 1)
        expected = model(images).float()
    torch.manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    logits = train_step().detach().float()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row["compile_s"] = time.perf_counter() - t0
    err = float((logits - expected).norm() / expected.norm().clamp_min(1e-30))
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
    row["logits_rel_err_vs_eager"] = err
    row["check_passed"] = bool(err <= tol and torch.isfinite(logits).all())
    if not row["check_passed"]:
        return row
    row["train_step_ms"] = measure.summarize(timer(train_step))
    row["train_images_per_s"] = images.shape[0] / (row["train_step_ms"]["median"] / 1e3)
    return row
