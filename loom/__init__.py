"""Loom: a structured-generation language runtime.

The face of the project: `loom.Engine` (the offline engine), `loom.Runtime` (the engine's processes
as a language backend) and the prompt-program language (`import loom as sgl`).
Heavy modules (torch, transformers) load only when first used, so `import loom` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from loom._import_path import drop_source_root

# First of all: a checkout's root on sys.path would make its kernels/, runtime/ and lang/ folders
# shadow installed packages (see loom/_import_path.py).
drop_source_root()

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("loom.runtime.entrypoints.engine", "Engine"),
    "LocalEngine": ("loom.runtime.entrypoints.engine", "LocalEngine"),
    "Runtime": ("loom.local_runtime", "Runtime"),
    "ServerArgs": ("loom.runtime.server_args", "ServerArgs"),
    "EngineArgumentError": ("loom.runtime.server_args", "EngineArgumentError"),
    "SamplingParams": ("loom.runtime.sampling_params", "SamplingParams"),
}
# The front-end language (`import loom as sgl` runs SGLang programs), from loom.lang.
_LANG = (
    "OpenAI", "ProgramState", "RunTrace", "RuntimeEndpoint", "ZmqEndpoint", "assistant", "assistant_begin", "assistant_end",
    "flush_cache", "function", "gen", "gen_int", "gen_string", "get_server_info", "greedy_token_selection", "image",
    "select", "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
)  # fmt: skip
_LAZY.update({name: ("loom.lang", name) for name in _LANG})

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loom' has no attribute {name!r}")
