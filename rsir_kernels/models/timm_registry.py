"""The RSIR models (config.MODEL_NAMES) in timm's model registry (timm >= 1.0, optional).

`import rsir_kernels` calls register_when_timm_imported(): it registers at once when timm is
already imported, else when timm is first imported (an import hook), so that importing
rsir_kernels never imports timm itself (that would add seconds). register() does it now.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import threading

from . import rsir
from .config import MODEL_NAMES, VARIANTS
from .rsir import RSIRTransformer, default_cfg

# the weight sources timm reads; none exists for RSIR
_WEIGHT_SOURCES = ("url", "file", "state_dict", "hf_hub_id")

default_cfgs: dict = {}  # timm's register_model reads the module's default_cfgs


def _create(variant: str, pretrained: bool = False, **kwargs) -> RSIRTransformer:
    from timm.models import build_model_with_cfg

    sources = [kwargs.get("pretrained_cfg_overlay") or {}, kwargs.get("pretrained_cfg") or {}]
    if pretrained and not any(isinstance(cfg, dict) and cfg.get(k) for cfg in sources for k in _WEIGHT_SOURCES):
        raise ValueError(f"pretrained=True: no pretrained weights exist for {variant}. Use "
                         "pretrained=False, or name your own checkpoint with "
                         "pretrained_cfg_overlay=dict(file='path/to/weights.pth').")
    config = VARIANTS[variant].config
    out_indices = kwargs.pop("out_indices", tuple(range(len(config.depths))))
    return build_model_with_cfg(RSIRTransformer, variant, pretrained, config=config,
                                feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
                                **kwargs)


def _entrypoint(name: str):
    """timm's entrypoint for `name`: registered under its __name__, in this module (whose
    default_cfgs timm reads); the docstring is models.rsir's builder's."""
    def entrypoint(pretrained: bool = False, **kwargs) -> RSIRTransformer:
        return _create(name, pretrained, **kwargs)
    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__doc__ = getattr(rsir, name).__doc__
    return entrypoint


ENTRYPOINTS = {name: _entrypoint(name) for name in MODEL_NAMES}


_registered = False
_lock = threading.Lock()  # one registration, whichever thread gets there first


def register() -> bool:
    """Registers the models and marks RSIRAttention as a leaf for timm's FX feature
    extraction (its token orders can't be traced symbolically). Imports timm. Returns False,
    registering nothing, when timm is absent or older than 1.0."""
    global _registered
    # timm is imported before the lock is taken: a thread importing timm holds timm's module
    # lock and, from the import hook, calls register() (which must not wait on a thread that
    # holds _lock and waits for timm's import)
    try:
        import timm
        from timm.models import generate_default_cfgs, register_model, register_notrace_module
    except ImportError:
        return False
    if int(timm.__version__.split(".")[0]) < 1:
        return False
    from ..modules import RSIRAttention

    with _lock:
        if not _registered:
            default_cfgs.update(generate_default_cfgs({name: default_cfg() for name in MODEL_NAMES}))
            for entrypoint in ENTRYPOINTS.values():
                register_model(entrypoint)
            register_notrace_module(RSIRAttention)
            _registered = True
    return True


class _RegisterAfterTimm(importlib.abc.Loader):
    """Runs timm's own loader, then register()."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        register()


class _TimmImportHook(importlib.abc.MetaPathFinder):
    """Finds timm with the other finders, once, and wraps its loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "timm":
            return None
        _remove_hook()
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterTimm(spec.loader)
        return spec


def _remove_hook():
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TimmImportHook)]


def register_when_timm_imported() -> None:
    """register() now if timm is imported, else when it is; nothing (and no warning) without timm."""
    if "timm" in sys.modules:
        if sys.modules["timm"] is not None:
            register()
        return
    if importlib.util.find_spec("timm") is None:
        return
    _remove_hook()
    sys.meta_path.insert(0, _TimmImportHook())
