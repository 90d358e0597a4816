"""Run by tests/test_train.py under torchrun (2 processes, gloo): DDP or FSDP2 training checks.

    torchrun --nproc_per_node 2 tests/train_worker.py {ddp|fsdp} OUT

Writes OUT/result.json on rank 0 (the test reads and asserts on it):
ddp: after every optimizer step each rank's parameters are gathered and compared bitwise
     ("steps_checked", "unequal_steps"); 4 epochs straight vs 2 epochs + --resume for 2
     ("resume_bitwise_equal"), whose metrics of epochs 3-4 must match too; the ranks' RNG
     states differ ("rank_rng_differ").
uneven: FSDP2 and DDP on validation shards of 2 and 1 batches (see uneven()), then a
     divergence on one rank.
paper: --recipe paper on the ImageFolder tree OUT/tree for 2 epochs; counts, on each rank, the
     calls of every element of the recipe (RandAugment and random erasing in the loader, mixup
     in the step, drop path in the model's forward, clipping at 5 in the step).
reshard-1a, reshard-2, reshard-1c (torchrun with 1, 2, 1 processes, in this order): sharded
     checkpoints across world sizes, in fp64 without randomness (fp64_without_randomness());
     each writes OUT/<mode>.pt (see reshard()).
fsdp: 5 epochs of FSDP2 on 384 training images ("val_top1" per epoch), then the saved checkpoint loaded into a plain
     timm model evaluated on the same shards ("plain_top1", "fsdp_top1").
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from rsir_kernels.train import build, cli, run
from rsir_kernels.checkpoint_format import load
from rsir_kernels.train.data import digits, eval_loader, subset
from rsir_kernels.train.distributed import World
from rsir_kernels.train.loop import evaluate

COMMON = ["--data", "digits", "--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1"]


def args(*extra):
    return cli.parser().parse_args(COMMON + list(extra))


def flat_params(model):
    module = getattr(model, "module", model)
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def ddp(out):
    checked, unequal = [0], []

    def compare_ranks(step, loss, model):
        mine = flat_params(model)
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        checked[0] += 1
        if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
            unequal.append(step)

    small = ["--batch-size", "32", "--train-items", "160", "--val-items", "64", "--epochs", "4"]
    straight = run.train(args(*small, "--output", f"{out}/straight"), on_step=compare_ranks)
    run.train(args(*small, "--output", f"{out}/resumed", "--stop-after", "2"), on_step=compare_ranks)
    resumed = run.train(args(*small, "--resume", f"{out}/resumed/last.pt"), on_step=compare_ranks)
    if int(os.environ["RANK"]):
        return
    a, b = load(f"{out}/straight/last.pt"), load(f"{out}/resumed/last.pt")
    keys = ("epoch", "train_loss", "val_loss", "val_top1")
    result = {"steps_checked": checked[0], "unequal_steps": unequal,
              "resume_bitwise_equal": a["model"].keys() == b["model"].keys()
              and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]),
              "metrics_equal": [{k: r[k] for k in keys} for r in straight["metrics"]]
              == [{k: r[k] for k in keys} for r in resumed["metrics"]],
              "epochs": [r["epoch"] for r in resumed["metrics"]],
              "rank_rng_differ": not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])}
    json.dump(result, open(f"{out}/result.json", "w"))


def fsdp(out):
    result = run.train(args("--fsdp", "--batch-size", "64", "--epochs", "5", "--train-items", "384",
                            "--val-items", "200", "--output", f"{out}/fsdp"))
    if int(os.environ["RANK"]):
        return
    import timm
    saved = load(f"{out}/fsdp/last.pt")
    plain = timm.create_model("rsir_micro", num_classes=10, in_chans=1, window_size=4, backend="cpp")
    plain.load_state_dict(saved["model"])  # strict: the same keys, full tensors
    val = subset(digits().val, 200)
    hits = items = 0
    for rank in range(2):  # the shards and batches the FSDP run evaluated, one process
        shard = evaluate(plain, eval_loader(val, 32, rank, 2, 0), world=World(rank, 1, 0, torch.device("cpu")),
                         seed=0)
        hits += shard["top1"] * shard["items"] / 100
        items += shard["items"]
    json.dump({"val_top1": [r["val_top1"] for r in result["metrics"]], "plain_top1": 100 * hits / items,
               "fsdp_top1": result["metrics"][-1]["val_top1"]}, open(f"{out}/result.json", "w"))


def paper(out):
    import timm.data
    from timm.data.auto_augment import RandAugment
    from timm.data.random_erasing import RandomErasing
    from rsir_kernels.modules import DropPath
    calls = {"randaugment": 0, "erasing": 0, "mixup_soft_targets": 0, "drop_path": 0, "clip": []}

    def counting(cls, key, check=None):
        original = cls.__call__

        def call(self, *a, **k):
            result = original(self, *a, **k)
            if check is None or check(self, result):
                calls[key] += 1
            return result
        cls.__call__ = call
    counting(RandAugment, "randaugment")
    counting(RandomErasing, "erasing", lambda self, r: self.probability == 0.25 and self.mode == "pixel"
             and self.max_count == 1)
    counting(timm.data.Mixup, "mixup_soft_targets", lambda self, r: r[1].ndim == 2 and self.mixup_alpha == 0.8
             and self.cutmix_alpha == 1.0)
    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *a, **k):
        calls["clip"].append(max_norm)
        return clip(parameters, max_norm, *a, **k)
    torch.nn.utils.clip_grad_norm_ = recording_clip

    def count_drop_path(module, inputs, output):
        if module.training and module.p > 0:
            calls["drop_path"] += 1

    def hook_drop_path(step, loss, model):
        if step == 1:  # after the first step: the hooks count from the second on
            for m in model.modules():
                if isinstance(m, DropPath):
                    m.register_forward_hook(count_drop_path)
    result = run.train(cli.parser().parse_args([
        "--data", f"{out}/tree", "--model", "rsir_micro", "--backend", "cpp", "--no-progress", "--threads", "1",
        "--recipe", "paper", "--img-size", "32", "--window-size", "4", "--workers", "0", "--batch-size", "16",
        "--epochs", "2", "--output", f"{out}/paper"]), on_step=hook_drop_path)
    module = result["model"]
    calls["drop_path_rates"] = [m.p for m in module.modules() if isinstance(m, DropPath)]
    gathered = [None, None]
    dist.all_gather_object(gathered, calls)
    if int(os.environ["RANK"]) == 0:
        json.dump({"ranks": gathered, "epochs": [r["epoch"] for r in result["metrics"]],
                   "args": load(f"{out}/paper/last.pt")["args"]}, open(f"{out}/result.json", "w"))


def fp64_without_randomness():
    """Patches this process so that a step's result does not depend on how the batch is split:
    RS-Win takes each layer's fixed eval order in training too, the model and the digits are
    fp64, and the LayerNorms get random weights and biases (after a LayerNorm at weight 1, bias 0
    the channel means IR-Win sorts by are rounding noise). Drop path and mixup are off by default."""
    from torch import nn
    from torch.utils.data import TensorDataset
    from rsir_kernels import modules
    from rsir_kernels.samplers import fixed_rs_index
    from rsir_kernels.train import data as datasets
    modules.RSIRAttention.rs_order = lambda self, batch, height, width, device: fixed_rs_index(
        height, width, self.window_size, self.seed, device)
    make_model, make_digits = build.create_model, datasets.digits

    def create_model(*a, **k):
        model = make_model(*a, **k).double()
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.LayerNorm):
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64))
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
        return model

    def digits64(seed=0):
        d = make_digits(seed)
        d.train, d.val = (TensorDataset(s.tensors[0].double(), s.tensors[1]) for s in (d.train, d.val))
        return d
    build.create_model, datasets.digits = create_model, digits64


def reshard(out, mode):
    """reshard-1a: "straight" (one process, 2 epochs), "one" (one process, epoch 1 of 2);
    reshard-2 (2 processes): "fsdp_accum" and "ddp_accum" (2 epochs, --grad-accum-steps 2),
    FSDP2: "fsdp" (epoch 1 of 2), "fsdp_straight" (2 epochs), --resume
    fsdp (same world size), --resume one (1 -> 2); reshard-1c: --resume fsdp in one process
    (2 -> 1). Each resume first loads with --stop-after 1 (no step) and keeps the loaded full
    weights and optimizer state ("loaded_<run>"), then trains epoch 2. Saved in OUT/<mode>.pt:
    each run's full weights after every step ("<run>", a list), the loaded states, the
    checkpoint they came from ("saved_<run>") and its DCP folder read by torch's
    dcp_to_torch_save ("dcp_<run>")."""
    from rsir_kernels.train import state_dicts as d
    fp64_without_randomness()
    small = ["--batch-size", "32", "--train-items", "96", "--val-items", "32", "--epochs", "2"]
    record, saved = {}, {}

    def steps(name, fsdp):
        record[name] = []

        def on_step(step, loss, model):  # copies (a CPU state dict holds the live tensors)
            module = getattr(model, "module", model)  # DDP's wrapper
            record[name].append({k: v.clone() for k, v in d.full_model_state(module).items()})
        return on_step

    def resume(name, source, fsdp):
        extra = ["--fsdp"] if fsdp else []
        path = f"{out}/{source}/last.pt"
        if int(os.environ["RANK"]) == 0:  # the files as saved, read before the resumed run replaces them
            saved[f"saved_{name}"] = load(path)
            if saved[f"saved_{name}"]["sharded"]:
                from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
                dcp_to_torch_save(f"{out}/{source}/{saved[f'saved_{name}']['sharded']}", f"{out}/{name}.dcp.pt")
                saved[f"dcp_{name}"] = torch.load(f"{out}/{name}.dcp.pt", weights_only=True)
        dist.barrier()
        loaded = run.train(args(*small, *extra, "--resume", path, "--stop-after", "1"))
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        saved[f"loaded_{name}"] = {"model": get_model_state_dict(loaded["model"], options=options),
                                   "optimizer": get_optimizer_state_dict(loaded["model"], loaded["optimizer"],
                                                                         options=options)}
        run.train(args(*small, *extra, "--resume", path), on_step=steps(name, fsdp))
    if mode == "reshard-1a":
        run.train(args(*small, "--output", f"{out}/straight"), on_step=steps("straight", False))
        run.train(args(*small, "--output", f"{out}/one", "--stop-after", "1"))
    elif mode == "reshard-2":
        run.train(args(*small, "--fsdp", "--output", f"{out}/fsdp_straight"), on_step=steps("fsdp_straight", True))
        for wrap in ("fsdp", "ddp"):  # 2 micro-batches of 8 per rank: FSDP2's and DDP's sync skipped on the first
            run.train(args(*small, "--grad-accum-steps", "2", *(["--fsdp"] if wrap == "fsdp" else []), "--output",
                           f"{out}/{wrap}_accum"), on_step=steps(f"{wrap}_accum", wrap == "fsdp"))
        run.train(args(*small, "--fsdp", "--output", f"{out}/fsdp", "--stop-after", "1"))
        import shutil
        if int(os.environ["RANK"]) == 0:
            shutil.copytree(f"{out}/fsdp", f"{out}/fsdp_copy")  # for reshard-1c: this run goes on below
        dist.barrier()
        resume("fsdp_2_to_2", "fsdp", True)
        resume("one_1_to_2", "one", True)
    else:
        resume("fsdp_2_to_1", "fsdp_copy", False)
    if int(os.environ["RANK"]) == 0:
        torch.save(record | saved, f"{out}/{mode}.pt")


def uneven(out):
    """FSDP2, then DDP, with 33 validation items (rank 0: 17 = 2 batches of 16, rank 1: 16 = 1):
    both end; each metrics row against the saved weights evaluated here on the same shards.
    Then a divergence on rank 1 alone (its weights made NaN after step 1): every rank raises."""
    from rsir_kernels.models import from_checkpoint
    from rsir_kernels.train.loop import Diverged
    small = ["--batch-size", "32", "--train-items", "64", "--val-items", "33", "--epochs", "1"]
    result = {}
    for mode in ("fsdp", "ddp"):
        row = run.train(args(*small, *(["--fsdp"] if mode == "fsdp" else []), "--output", f"{out}/{mode}"))["metrics"]
        if int(os.environ["RANK"]) == 0:
            model = from_checkpoint(f"{out}/{mode}/last.pt", backend="cpp")
            val = subset(digits().val, 33)
            shards = [evaluate(model, eval_loader(val, 16, rank, 2, 0), world=World(rank, 1, 0, torch.device("cpu")),
                               seed=0) for rank in range(2)]
            result[mode] = {"val_top1": row[-1]["val_top1"], "items": sum(s["items"] for s in shards),
                            "recounted_top1": sum(s["top1"] * s["items"] for s in shards) / 33}

    def poison_rank_1(step, loss, model):
        if step == 1 and int(os.environ["RANK"]) == 1:
            with torch.no_grad():
                next(iter(getattr(model, "module", model).parameters())).fill_(float("nan"))
    try:
        run.train(args(*small, "--epochs", "2", "--output", f"{out}/diverge"), on_step=poison_rank_1)
        diverged = None
    except Diverged as e:
        diverged = str(e)
    dist.barrier()  # both ranks got here: none is left waiting in a collective
    result[f"diverged_{os.environ['RANK']}"] = diverged
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if int(os.environ["RANK"]) == 0:
        json.dump(gathered[0] | {"diverged_1": gathered[1]["diverged_1"]}, open(f"{out}/result.json", "w"))


if __name__ == "__main__":
    dist.init_process_group("gloo")  # one group for the several runs (train() leaves it open)
    if sys.argv[1].startswith("reshard"):
        reshard(sys.argv[2], sys.argv[1])
    else:
        {"ddp": ddp, "fsdp": fsdp, "uneven": uneven, "paper": paper}[sys.argv[1]](sys.argv[2])
    dist.destroy_process_group()
