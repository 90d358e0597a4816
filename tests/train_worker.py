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
fsdp: 5 epochs of FSDP2 on 384 training images ("val_top1" per epoch), then the saved checkpoint loaded into a plain
     timm model evaluated on the same shards ("plain_top1", "fsdp_top1").
"""
import json
import os
import sys

import torch
import torch.distributed as dist

from rsir_kernels.train import cli, run
from rsir_kernels.train.checkpoint import load
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
    {"ddp": ddp, "fsdp": fsdp, "uneven": uneven, "paper": paper}[sys.argv[1]](sys.argv[2])
    dist.destroy_process_group()
