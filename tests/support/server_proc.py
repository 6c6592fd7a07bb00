"""A real `python -m loom serve` child for end-to-end tests (HTTP), shared by the test modules.

`Server(model, *flags)` starts the process at once (so several can load their models in
parallel); `wait_ready()` blocks until /health answers and opens an httpx client.
`with serving(model, *flags) as srv:` is a ready server inside the block, stopped after it.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx

API_KEY = "test-key-123"
MAX_TOTAL_TOKENS = 2048


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: pathlib.Path | str, *extra: str, max_total_tokens: int = MAX_TOTAL_TOKENS) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "loom", "serve", "--model", str(model), "--port", str(self.port),
               "--max-total-tokens", str(max_total_tokens), *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.api_key = extra[extra.index("--api-key") + 1] if "--api-key" in extra else None
        self.headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.client: httpx.Client | None = None

    def wait_ready(self, timeout_s: float = 120.0) -> Server:
        if self.client is not None:
            return self
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, f"server exited early:\n{self.proc.stdout.read()}"
            assert time.monotonic() < deadline, f"server not ready in {timeout_s:.0f}s"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.client = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)
        return self

    def info(self) -> dict:
        assert self.client is not None, "call wait_ready() first"
        return self.client.get("/get_server_info").json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.client is not None:
            self.client.close()


@contextlib.contextmanager
def serving(model: pathlib.Path | str, *extra: str) -> Iterator[Server]:
    """A ready `Server` inside the block (a module fixture's body); stopped after it, also when it
    never got ready."""
    srv = Server(model, *extra)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def child_pids(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            kids = pathlib.Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        for k in map(int, kids):
            found.add(k)
            todo.append(k)
    return found


def alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_during_request(srv: Server, process: str, max_new_tokens: int | None = 2000) -> tuple[httpx.Response, float]:
    """Send a long /generate, kill -9 the server's `process` (scheduler, detokenizer) half a second
    in -> (the request's answer, seconds from the kill to it)."""
    pid = srv.info()["pids"][process]
    answer: dict = {}

    def long_request() -> None:
        body = {"text": "x", "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}  # None: until the context is full
        try:
            answer["r"] = httpx.post(srv.url + "/generate", json=body, timeout=30)
        except httpx.HTTPError as exc:  # pragma: no cover - reported below
            answer["exc"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    t.join(15)
    assert answer.get("r") is not None, answer
    return answer["r"], time.monotonic() - t0
