"""Start the engine's processes from a program: `python -m loom serve` with the ZeroMQ front door.

`loom.Runtime` stands on this: the server runs as a child process (its own scheduler and
detokenizer below it), serving only the front door on an `ipc://` socket in a private 0700
folder, and stops when this process stops (SIGTERM from `shutdown()`, from an atexit hook, or
the child noticing that its parent is gone).
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from typing import Any

import zmq

from loom.runtime.protocol import FrontRequest, decode_reply, encode
from loom.runtime.server_args import ServerArgs


def engine_flags(engine_args: dict[str, Any]) -> list[str]:
    """ServerArgs keywords -> `loom serve` flags. Unknown keywords fail here (EngineArgumentError)."""
    ServerArgs.check_names(engine_args)
    fields = {f.name: f for f in dataclasses.fields(ServerArgs)}
    flags: list[str] = []
    for name, value in engine_args.items():
        if value is None or value == fields[name].default:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


class ServerProcess:
    """A `loom serve --no-http --zmq-address ipc://...` child, ready when the constructor returns."""

    def __init__(self, model_path: str, *, log_level: str = "warning", timeout_s: float = 600.0,
                 http_port: int | None = None, **engine_args: Any) -> None:  # fmt: skip
        ServerArgs.from_kwargs(model_path, **engine_args)  # every argument checked here, before a process starts
        self._dir = tempfile.mkdtemp(prefix="loom-rt-")
        os.chmod(self._dir, 0o700)
        self.address = f"ipc://{self._dir}/front"
        cmd = [sys.executable, "-m", "loom", "--log-level", log_level, "serve", "--model", str(model_path),
               "--zmq-address", self.address, "--parent-pid", str(os.getpid()), *engine_flags(engine_args)]  # fmt: skip
        cmd += ["--port", str(http_port)] if http_port is not None else ["--no-http"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self._log: deque[str] = deque(maxlen=200)
        threading.Thread(target=self._drain, daemon=True, name="loom-runtime-log").start()
        atexit.register(self.shutdown)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line)
            if os.environ.get("LOOM_RUNTIME_ECHO") == "1":
                sys.stderr.write(line)

    def log_tail(self) -> str:
        return "".join(self._log)

    def exit_reason(self) -> str | None:
        """Why the server is gone (its exit code and last log lines), or None while it runs."""
        code = self.proc.poll()
        if code is None:
            return None
        return f"the loom server process exited with code {code}:\n{self.log_tail()[-2000:]}"

    def _wait_ready(self, timeout_s: float) -> None:
        """Ask `health` until the front answers: the front door binds only once the model is loaded."""
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        try:
            probe = f"ready-{uuid.uuid4().hex}"
            sock.send(encode(FrontRequest(probe, "health")))
            deadline = time.monotonic() + timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the loom server exited with code {self.proc.returncode} while starting:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the loom server did not answer within {timeout_s:.0f}s:\n{self.log_tail()}")
                if sock.poll(200):
                    reply = decode_reply(sock.recv())
                    if reply.id == probe and reply.type == "done":
                        return
                    raise RuntimeError(f"the loom server is not healthy: {reply.body}")
        finally:
            sock.close()

    def shutdown(self, timeout_s: float = 30.0) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL) and remove the socket folder. Idempotent."""
        atexit.unregister(self.shutdown)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode
