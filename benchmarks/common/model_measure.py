"""Measurement of bench_model.py: which backends can run the model, and per backend the logits
check against `reference`, the bytes saved for backward, a timed training step and a timed
inference forward."""
from __future__ import annotations

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


def build(model_name, backend, device, seed, recompute_qkv=False):
    """The same weights and the same RS-Win generator seed for every backend."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    model_fn = {"tiny": rsir_tiny, "base": rsir_base}[model_name]
    return model_fn(backend=backend, generator=generator, recompute_qkv=recompute_qkv).to(device), generator


def bench_backend(name, args, device, dtype, images, labels, timer, progress) -> dict:
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype in (torch.float16, torch.bfloat16))
    row = {"backend": name}
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
            m.token_order = (lambda x, h, w, m=m, f=m.token_order: orders[id(m)].append(f(x, h, w)) or orders[id(m)][-1])
        expected = model(images).float()
        for m in attention:
            m.backend = name
            m.token_order = (lambda x, h, w, it=iter(orders[id(m)]): next(it))
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
