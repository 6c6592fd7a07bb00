"""`loom.Runtime`: the engine's processes started from a program, reached over ZeroMQ.

    with loom.Runtime(model_path="path/to/model", max_total_tokens=20000) as rt:
        loom.set_default_backend(rt)
        state = my_program.run(question="...")

It starts `loom serve --no-http` as a child (the front, then the scheduler and detokenizer
processes under it) with the front door on an `ipc://` socket in a private folder, waits until
the model is loaded, and is then the language backend on that socket (`ZmqEndpoint`): no HTTP on
the way. `shutdown()` (or leaving the `with` block, or the interpreter exiting) stops them all.
"""

from __future__ import annotations

from typing import Any

from loom.lang.backend.runtime_zmq import ZmqEndpoint
from loom.runtime.entrypoints.launch import ServerProcess


class Runtime(ZmqEndpoint):
    def __init__(self, model_path: str, *, log_level: str = "warning", timeout_s: float = 600.0, **engine_args: Any) -> None:
        """engine_args: the engine's arguments (`loom serve --help`), e.g. max_total_tokens,
        tp_size, dp_size, grammar_backend. A wrong one raises EngineArgumentError naming it, before
        any process starts."""
        self.server = ServerProcess(str(model_path), log_level=log_level, timeout_s=timeout_s, **engine_args)
        super().__init__(self.server.address, is_dead=self.server.exit_reason)
        self._closed = False

    def shutdown(self) -> None:
        """Stop the processes and remove the socket folder. Idempotent."""
        if self._closed:
            return
        self._closed = True
        super().shutdown()
        self.server.shutdown()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return f"Runtime({self.server.address!r}, pid={self.server.proc.pid})"
