"""Loom: a structured-generation language runtime.

The face of the project: `loom.Engine` (offline engine), and later the prompt-program language.
Heavy modules (torch, transformers) load only when first used, so `import loom` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("loom.runtime.engine", "Engine"),
    "ServerArgs": ("loom.runtime.server_args", "ServerArgs"),
    "SamplingParams": ("loom.runtime.sampling_params", "SamplingParams"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
