"""A classification checkpoint of this project's trainer loaded into a backbone's model, with
every mismatch refused by a ValueError that names it."""
from __future__ import annotations

import os
from typing import Union

import torch

from ..checkpoint_format import read
from ..models.rsir import RSIRTransformer

# RSIRConfig fields that shape the weights or the computation of the stages: a checkpoint trained
# with other values does not fit. (num_classes, global_pool, drop_rate, drop_path_rate, backend,
# recompute_qkv and rs_eval do not: the head is not loaded, the others are training or speed
# settings.)
ARCHITECTURE_FIELDS = ("embed_dim", "depths", "num_heads", "rs_heads", "window_size", "mlp_ratio",
                       "qkv_bias", "in_chans", "rs_seed")

Weights = Union[str, os.PathLike, dict]


def load_classification_weights(model: RSIRTransformer, weights: Weights, name: str) -> None:
    """Loads the stages (stem, stages, final norm) of a classification checkpoint into `model`
    (an RSIRTransformer built as `name` with num_classes=0); the classifier's weights are
    dropped. `weights`: a path to a training checkpoint (OUTPUT/last.pt, read with its checksum
    verified), such a checkpoint as a dict ({"model", "model_name", "model_args", ...};
    rsir_kernels/checkpoint_format.py), or a bare state dict.

    ValueError, naming the source: another model's checkpoint ("model_name"), another
    architecture in "model_args" (each field that differs, with both values), or a state dict
    that does not fit (missing, unexpected or mis-shaped tensors, another window size)."""
    source = f"weights {os.fspath(weights)}" if isinstance(weights, (str, os.PathLike)) else "weights"
    if isinstance(weights, (str, os.PathLike)):
        weights = read(os.fspath(weights), "weights")  # a ValueError naming the file if damaged
    if not isinstance(weights, dict):
        raise ValueError(f"{source}: expected a checkpoint or a state dict, got {type(weights).__name__}")
    checkpoint = weights if isinstance(weights.get("model"), dict) else {"model": weights}
    trained_as = checkpoint.get("model_name")
    if trained_as is not None and trained_as != name:
        raise ValueError(f"{source}: holds {trained_as}'s weights, the backbone is {name}: build it as "
                         f"{trained_as!r}")
    recorded = checkpoint.get("model_args") or {}
    differ = [(f, recorded[f], getattr(model.config, f)) for f in ARCHITECTURE_FIELDS
              if f in recorded and _plain(recorded[f]) != _plain(getattr(model.config, f))]
    if differ:
        trained = ", ".join(f"{f}={a!r}" for f, a, _ in differ)
        built = ", ".join(f"{f}={b!r}" for f, _, b in differ)
        raise ValueError(f"{source}: trained with {trained}, the backbone has {built}: pass {trained} "
                         "to build it as trained")
    state = {k: v for k, v in checkpoint["model"].items() if not k.startswith("head.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch's message lists every missing, unexpected and mis-shaped key
        problems = " ".join(line.strip() for line in str(e).splitlines()[1:] if line.strip())
        raise ValueError(f"{source} do not fit {name}: {problems}") from None


def _plain(value):
    """Lists (JSON) and tuples compare alike."""
    return tuple(value) if isinstance(value, (list, tuple)) else value
