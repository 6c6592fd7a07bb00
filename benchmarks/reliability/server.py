"""A `loom serve` child on a free loopback port (`bench_serving.Server`), with what the campaign reads
of it: /get_server_info, its processes, their resident memory, and what is left after it is gone."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import time

import httpx
from bench_serving import Server

POOL_MIN_BYTES = 1 << 20  # the KV pool's map (see rss_mib); smaller don't-dump maps are someone else's


class LoomServer(Server):
    def __init__(self, model: str, flags: list[str], startup_timeout: float = 600.0, api_key: str | None = None) -> None:
        super().__init__(model, flags + (["--api-key", api_key] if api_key else []), startup_timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(self, timeout: float = 300.0) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        return httpx.AsyncClient(base_url=self.url, headers=self.headers, trust_env=False, limits=limits,
                                 timeout=httpx.Timeout(timeout, connect=30.0))  # fmt: skip

    def info(self) -> dict:
        r = httpx.get(self.url + "/get_server_info", headers=self.headers, trust_env=False, timeout=60)
        r.raise_for_status()
        return r.json()

    def model_name(self) -> str:
        r = httpx.get(self.url + "/v1/models", headers=self.headers, trust_env=False, timeout=30)
        return r.json()["data"][0]["id"]

    def flush(self) -> int:
        return httpx.post(self.url + "/flush_cache", headers=self.headers, trust_env=False, timeout=60).status_code

    def wait_idle(self, timeout: float = 300.0) -> dict:
        """/get_server_info once nothing runs or waits and no KV is held by a request."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.info()
            if not info["num_running_reqs"] and not info["num_waiting_reqs"] and not info["memory"]["held"]:
                return info
            if time.monotonic() > deadline:
                return info
            time.sleep(0.5)

    def descendants(self) -> set[int]:
        assert self.proc is not None
        return descendants(self.proc.pid)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired: still running
            return None


def descendants(pid: int) -> set[int]:
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
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: set[int], paths: list[str], timeout: float) -> tuple[float, list[str]]:
    """Wait until no pid of `pids` lives and no path of `paths` exists -> (seconds, what is left)."""
    t0 = time.monotonic()
    while True:
        left = [f"pid {p}" for p in sorted(pids) if alive(p)] + [p for p in paths if os.path.exists(p)]
        if not left or time.monotonic() - t0 > timeout:
            return time.monotonic() - t0, left
        time.sleep(0.05)


def kill_all(pids: set[int]) -> None:
    for p in pids:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def rss_mib(pid: int) -> dict[str, float]:
    """The process's resident memory in MiB: total, the KV pool (the map flagged `dd`, don't-dump,
    that `radix_cache/memory_pool.py` makes), and the rest."""
    try:
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        smaps = pathlib.Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return {"total": float("nan"), "kv_pool": float("nan"), "rest": float("nan")}
    total = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
    pool, rss, size = 0.0, 0, 0
    for line in smaps.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            size = int(head.group(2), 16) - int(head.group(1), 16)
        elif line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("VmFlags:") and " dd" in line and size >= POOL_MIN_BYTES:
            pool += rss / 1024
    return {"total": total, "kv_pool": pool, "rest": total - pool}
