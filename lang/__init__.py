"""Loom's front-end language: SGLang-style prompt programs.

    import loom as sgl

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://127.0.0.1:30000"))
    print(qa.run(question="Hi?")["answer"])

Light to import: no torch, no transformers; the `openai` package only when `OpenAI` is used.
"""

from __future__ import annotations

from typing import Any

# isort: off
from loom.lang.api import (
    assistant, assistant_begin, assistant_end, flush_cache, gen, gen_int, gen_string, get_server_info, image, select,
    system, system_begin, system_end, user, user_begin, user_end,
)  # fmt: skip
# isort: on
from loom.lang.backend.base import Backend, NativeBackend
from loom.lang.backend.runtime_endpoint import RuntimeEndpoint
from loom.lang.backend.runtime_zmq import ZmqEndpoint
from loom.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized
from loom.lang.interpreter import ProgramError
from loom.lang.program import Program, function, get_default_backend, set_default_backend
from loom.lang.run_trace import RunTrace
from loom.lang.state import ForkGroup, ProgramState


def __getattr__(name: str) -> Any:
    if name == "OpenAI":  # pulls in the `openai` package
        from loom.lang.backend.openai import OpenAI

        return OpenAI
    raise AttributeError(f"module 'loom.lang' has no attribute {name!r}")


__all__ = [
    "Backend", "ForkGroup", "NativeBackend", "OpenAI", "Program", "ProgramError", "ProgramState", "RunTrace", "RuntimeEndpoint",
    "ZmqEndpoint", "assistant", "assistant_begin", "assistant_end", "flush_cache", "function", "gen", "gen_int",
    "gen_string", "get_default_backend", "get_server_info", "greedy_token_selection", "image", "select",
    "set_default_backend", "system", "system_begin", "system_end", "token_length_normalized",
    "unconditional_likelihood_normalized", "user", "user_begin", "user_end",
]  # fmt: skip
