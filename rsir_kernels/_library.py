"""The ops library librsir_ops.so: where it is, and loading it once per process.

It is a plain shared library of torch ops (TORCH_LIBRARY(rsir_ext), csrc/torch/), no Python
module: this package, a process that imports only torch, and a C++ program all load the same
file, with torch.ops.load_library or dlopen. A process holds one registration per op
namespace, so nothing here loads a second copy.
"""
from __future__ import annotations

import os
import threading
from typing import Optional

import torch

NAME = "librsir_ops.so"
_lock = threading.Lock()
_error: Optional[str] = None
_loaded = False


def library_path() -> str:
    """Absolute path of librsir_ops.so (built by setup.py next to this file), for
    torch.ops.load_library(path) in a process without rsir_kernels, or dlopen in C++.
    FileNotFoundError when it was not built."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} was not built")
    return path


def _registered() -> bool:
    try:
        torch._C._get_schema("rsir_ext::window_attention_fwd", "")
        return True
    except RuntimeError:
        return False


def load() -> Optional[str]:
    """Loads the library once (registering the rsir_ext ops); None if it is loaded, else why not."""
    global _error, _loaded
    with _lock:
        if not _loaded and _error is None:
            try:
                if not _registered():  # a copy the caller loaded (CMake's, say) is kept, not doubled
                    torch.ops.load_library(library_path())
                _loaded = True
            except (OSError, RuntimeError) as exc:  # not built, built against another torch, ...
                _error = f"{type(exc).__name__}: {exc}"
        return _error
