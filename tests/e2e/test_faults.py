"""A `loom serve` whose front dies (`kill -9`): its children notice and leave, nothing stays behind.

The scheduler and detokenizer check between any two steps that the front still lives, and a send
to a front that no longer reads stops blocking; the first one out removes the socket folder.
multiprocessing's resource tracker exits once the last process holding its pipe is gone.
(The deaths of the scheduler and the detokenizer are in test_server.py and below: 503, exit 1.)
"""

from __future__ import annotations

import os
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server, alive, child_pids, kill_during_request

LEFT_BEHIND_LIMIT_S = 10.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("faults"), arch="qwen2", vocab_size=512, seed=5)


@pytest.fixture(scope="module")
def servers(model_dir) -> Iterator[dict[str, Server]]:
    """One server per case, started together so that their model loads overlap."""
    started = {name: Server(model_dir) for name in ("busy", "idle", "detokenizer")}
    yield started
    for srv in started.values():
        srv.stop()


def _stream_forever(srv: Server, stop: threading.Event) -> None:
    """A client reading a long stream until the server goes away."""
    body = {"text": "x", "sampling_params": {"max_new_tokens": None, "ignore_eos": True}, "stream": True}  # null: until the context is full
    try:
        with httpx.stream("POST", srv.url + "/generate", json=body, timeout=30) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return
    except httpx.HTTPError:
        pass  # the front died under it


def _kill_front_and_wait(srv: Server) -> tuple[float, list[int]]:
    """kill -9 the front -> (seconds until no descendant lived and the socket folder was gone, leftovers)."""
    info = srv.info()
    descendants = child_pids(srv.proc.pid)
    assert set(info["pids"].values()) - {srv.proc.pid} <= descendants
    assert len(descendants) >= 3, f"expected scheduler, detokenizer and resource tracker: {descendants}"
    ipc_dir = pathlib.Path(info["ipc_dir"])
    assert ipc_dir.is_dir()
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait(5)
    while time.monotonic() - t0 < LEFT_BEHIND_LIMIT_S:
        left = [p for p in descendants if alive(p)]
        if not left and not ipc_dir.exists():
            return time.monotonic() - t0, []
        time.sleep(0.05)
    left = [p for p in descendants if alive(p)]
    for p in left:  # do not leave them to the next test
        os.kill(p, signal.SIGKILL)
    return time.monotonic() - t0, left + ([str(ipc_dir)] if ipc_dir.exists() else [])


@pytest.mark.slow
def test_front_killed_while_decoding_leaves_nothing_behind(servers):
    srv = servers["busy"].wait_ready()
    stop = threading.Event()
    clients = [threading.Thread(target=_stream_forever, args=(srv, stop), daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    deadline = time.monotonic() + 30
    while srv.info()["num_running_reqs"] < 4:  # the scheduler is busy decoding all four
        assert time.monotonic() < deadline, "the streams did not start"
        time.sleep(0.1)
    took, left = _kill_front_and_wait(srv)
    stop.set()
    assert not left, f"still there {took:.1f}s after the front died: {left}"
    srv.client.close()


@pytest.mark.slow
def test_front_killed_while_idle_leaves_nothing_behind(servers):
    srv = servers["idle"].wait_ready()
    took, left = _kill_front_and_wait(srv)
    assert not left, f"still there {took:.1f}s after the front died: {left}"
    srv.client.close()


@pytest.mark.slow
def test_killing_the_detokenizer_gives_503_and_nonzero_exit(servers):
    srv = servers["detokenizer"].wait_ready()
    info = srv.info()
    r, took = kill_during_request(srv, "detokenizer", max_new_tokens=None)
    assert r.status_code == 503 and "detokenizer" in r.json()["error"]["message"]
    assert took < 5
    assert srv.proc.wait(20) == 1
    assert not pathlib.Path(info["ipc_dir"]).exists(), "the socket folder was not removed"
    srv.client.close()
