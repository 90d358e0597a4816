"""Full (gathered) and sharded (DCP) state dicts of the model and optimizer for checkpoints,
through torch.distributed.checkpoint.state_dict for a plain module, DDP's module and FSDP2
alike (docs/design.md section 11 says where that holds and where it does not).

torch.distributed.checkpoint is imported where it is used: it adds seconds to every start.
"""
from __future__ import annotations

import torch
from torch import nn


def _full(on_rank0: bool = True):
    """DCP's options for full (gathered) tensors, for FSDP2, DDP's module and a plain one alike
    (docs/design.md section 11); on_rank0: on the CPU, on rank 0 only (the others get {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=on_rank0)


def full_model_state(model: nn.Module) -> dict:
    """The model's state dict of full CPU tensors, valid on rank 0 (under FSDP2 a gathering
    collective): DCP's get_model_state_dict. On a plain module these are its own tensors (no copy)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_full())


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(full_model_state, the optimizer's state dict keyed by parameter index as
    optimizer.state_dict() keys it, the format of last.pt), valid on rank 0: DCP's get_state_dict."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_full())
    return model_state, _by_index(model, optimizer, optimizer_state)


def load_full_model(model: nn.Module, state: dict) -> None:
    """A full state dict into the FSDP2-sharded model, on every rank (set_model_state_dict: each rank
    keeps its shards). A plain module takes model.load_state_dict before DDP wraps it instead:
    set_model_state_dict(full_state_dict=True) fills a key missing from the state dict with the
    module's own tensor where load_state_dict refuses it (and names it), so a checkpoint without
    the window-size record would load without its warning (docs/design.md section 11)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(model, state, options=_full(on_rank0=False))


def load_full_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """last.pt's optimizer state (index- or name-keyed) into the optimizer of `model` (plain,
    DDP's module or FSDP2-sharded), on every rank: DCP's set_optimizer_state_dict."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, state), options=_full(on_rank0=False))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """torch.distributed.checkpoint of {"model", "optimizer"} into the folder path, each rank
    writing its own shards (a collective under FSDP2; one process writes everything)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=path)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: str) -> None:
    """Inverse of save_sharded at any world size, FSDP2 or a plain module: DCP reads the slices
    of each saved tensor this rank's shards (or full tensors) need."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _parameter_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters' names in its index order (the param groups' order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """An optimizer state dict keyed by parameter index (optimizer.state_dict(), last.pt's) keyed
    by parameter name instead, as set_optimizer_state_dict takes it; the indices follow the
    param groups, which this optimizer was built in the same order."""
    if all(isinstance(i, str) for g in state["param_groups"] for i in g["params"]):
        return state
    order = _parameter_names(model, optimizer)
    return {"state": {order[i]: v for i, v in state["state"].items()},
            "param_groups": [dict(g, params=[order[i] for i in g["params"]]) for g in state["param_groups"]]}


def _by_index(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """Inverse of _by_name: get_optimizer_state_dict's name-keyed state keyed by index, as
    last.pt holds it (a rank other than 0 gets {} and keeps it)."""
    if not state:
        return state
    index = {name: i for i, name in enumerate(_parameter_names(model, optimizer))}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]}
