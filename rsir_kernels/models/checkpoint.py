"""from_checkpoint(path): the model a training checkpoint (OUTPUT/last.pt) came from."""
from __future__ import annotations

from torch import nn

from ..checkpoint_format import read
from .config import MODEL_NAMES
from .rsir import build


def from_checkpoint(path: str, backend: str | None = None) -> nn.Module:
    """Rebuilds the trained model from the file alone: model_name(**model_args) with the saved
    weights, in eval mode (checksum verified; ValueError naming the file if it is damaged or not
    a training checkpoint). backend (window_attention's, e.g. "cpp") replaces the recorded one;
    it changes speed, not the computation. The class names, if any, are in
    torch.load(path, weights_only=True)["class_names"]."""
    saved = read(path)
    if not isinstance(saved, dict) or saved.get("model_name") not in MODEL_NAMES or "model_args" not in saved:
        raise ValueError(f"{path}: not a training checkpoint of rsir_kernels.train (no model_name and model_args)")
    kwargs = dict(saved["model_args"])
    if backend is not None:
        kwargs["backend"] = backend
    model = build(saved["model_name"], **kwargs)
    model.load_state_dict(saved["model"])
    return model.eval()
