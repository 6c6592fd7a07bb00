"""The engine's processes under the front: the detokenizer and one scheduler per tensor-parallel
rank of this node, started with multiprocessing's spawn, watched, and stopped.

A child that exits is the end of the engine: `death()` names it, and the async engine fails every
request with it (503) rather than serve at half capacity or hang.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Any

from loom.runtime.detokenizer.process import run_detokenizer_process
from loom.runtime.ipc import IpcPaths
from loom.runtime.scheduler.process import spawn_scheduler_ranks
from loom.runtime.server_args import ServerArgs

STOP_TIMEOUT_S = 5.0  # per child, after SIGTERM and again after SIGKILL


@dataclass
class Child:
    name: str
    proc: Any  # multiprocessing.Process


class EngineProcesses:
    def __init__(self) -> None:
        self.children: list[Child] = []

    def start(self, args: ServerArgs, paths: IpcPaths, log_level: str) -> None:
        """Start the detokenizer, then this node's scheduler ranks (they load the model)."""
        spawn = mp.get_context("spawn")
        detok = spawn.Process(target=run_detokenizer_process, args=(args.to_dict(), paths, os.getpid(), log_level),
                              name="loom-detokenizer", daemon=True)  # fmt: skip
        detok.start()
        self.children.append(Child("detokenizer", detok))
        self.children += [Child(name, proc) for name, proc in spawn_scheduler_ranks(args, paths, log_level)]

    def death(self) -> str | None:
        """Why the engine cannot serve any more (the first child that exited), or None."""
        for child in self.children:
            code = child.proc.exitcode
            if code is not None:
                return f"the {child.name} process died (exit code {code}); the server cannot serve requests"
        return None

    def stop(self) -> None:
        """SIGTERM every child, then SIGKILL those still alive after STOP_TIMEOUT_S."""
        for child in self.children:
            if child.proc.is_alive():
                child.proc.terminate()
        for child in self.children:
            child.proc.join(STOP_TIMEOUT_S)
            if child.proc.is_alive():
                child.proc.kill()
                child.proc.join(STOP_TIMEOUT_S)

    @property
    def pids(self) -> dict[str, int]:
        return {c.name: c.proc.pid for c in self.children}
