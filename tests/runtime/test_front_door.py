"""The ZeroMQ front door end to end: a real `loom serve --no-http --zmq-address ipc://...` child
(started the way `loom.Runtime` starts it) and a raw DEALER speaking `loom.runtime.protocol`."""

from __future__ import annotations

import json
import pathlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.entrypoints.launch import ServerProcess, engine_flags
from loom.runtime.protocol import FrontReply, FrontRequest, decode_reply, encode
from loom.runtime.server_args import EngineArgumentError

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
MAX_TOTAL_TOKENS = 1024


class Client:
    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, method: str, body: dict[str, Any] | None = None, rid: str | None = None) -> str:
        rid = rid or uuid.uuid4().hex
        self.sock.send(encode(FrontRequest(rid, method, body or {})))
        return rid

    def replies(self, rid: str, timeout_s: float = 60.0) -> Iterator[FrontReply]:
        """This request's replies up to its last ("done" or "error")."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), "no reply in time"
            reply = decode_reply(self.sock.recv())
            if reply.id != rid:
                continue  # a late chunk of a stream this client cancelled
            yield reply
            if reply.type != "chunk":
                return

    def call(self, method: str, body: dict[str, Any] | None = None) -> FrontReply:
        return list(self.replies(self.send(method, body)))[-1]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("door"), arch="llama", vocab_size=384, seed=11)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[ServerProcess]:
    srv = ServerProcess(str(model_dir), max_total_tokens=MAX_TOTAL_TOKENS, debug_check_memory=True)
    yield srv
    assert srv.shutdown() == 0
    assert not pathlib.Path(srv.address.removeprefix("ipc://")).parent.exists()


@pytest.fixture()
def client(server) -> Iterator[Client]:
    c = Client(server.address)
    yield c
    c.close()


def test_engine_flags_round_trip():
    assert engine_flags({"max_total_tokens": 64, "disable_radix_cache": True, "schedule_policy": "lpm"}) == [
        "--max-total-tokens", "64", "--disable-radix-cache",
    ]  # fmt: skip
    with pytest.raises(EngineArgumentError, match="max_total_tokenz"):
        engine_flags({"max_total_tokenz": 1})


def test_generate_equals_the_offline_engine(client, model_dir):
    prompts = ["The cat", "A dog and a"]
    done = client.call("generate", {"text": prompts, "sampling_params": GREEDY})
    assert done.type == "done" and [r["text"] for r in done.body]
    with LocalEngine(model_path=str(model_dir), max_total_tokens=MAX_TOTAL_TOKENS) as engine:
        expected = engine.generate(prompts, GREEDY)
    assert [r["output_ids"] for r in done.body] == [r["output_ids"] for r in expected]
    single = client.call("generate", {"text": prompts[0], "sampling_params": GREEDY})
    assert single.body["text"] == expected[0]["text"] and single.body["meta_info"]["completion_tokens"] == 8


def test_stream_gives_deltas_and_ends_with_done(client):
    """The front door streams what the detokenizer made: new text and new ids per chunk (only
    SGLang's HTTP /generate turns them into cumulative text)."""
    body = {"text": "Once upon", "sampling_params": GREEDY, "stream": True}
    replies = list(client.replies(client.send("generate", body)))
    chunks, last = replies[:-1], replies[-1]
    assert last.type == "done" and last.body is None and chunks
    assert sum(len(c.body["output_ids"]) for c in chunks) == 8
    assert chunks[-1].body["meta_info"]["finish_reason"]["type"] == "length"
    plain = client.call("generate", {**body, "stream": False})
    assert "".join(c.body["text"] for c in chunks) == plain.body["text"]
    assert sum((c.body["output_ids"] for c in chunks), []) == plain.body["output_ids"]


def test_info_health_flush_and_errors(client, model_dir):
    info = client.call("get_model_info").body
    assert info["model_path"] == str(model_dir) and info["chat_template"]
    assert client.call("health").type == "done"
    assert client.call("flush_cache").body == {"success": True}
    bad = client.call("generate", {"text": "x", "sampling_params": {"temperature": -1}})
    assert bad.type == "error" and bad.body["status"] == 400 and "temperature" in bad.body["error"]["message"]
    bad = client.call("generate", {"text": "x", "sampling_params": {"regex": "(", "max_new_tokens": 4}})
    assert bad.body["status"] == 400 and bad.body["error"]["param"] == "sampling_params.regex"
    bad = client.call("generate", {"prompt": "x"})
    assert bad.body["status"] == 400 and bad.body["error"]["param"] == "prompt"
    assert client.call("teleport").body["error"]["param"] == "method"
    # A frame that is not a FrontRequest gets an error and the door keeps serving.
    client.sock.send(b"\x93not a request")
    garbage = decode_reply(client.sock.recv())
    assert garbage.type == "error" and garbage.body["status"] == 400
    assert client.call("health").type == "done"


def _memory(client: Client) -> dict:
    return client.call("get_server_info").body["memory"]


def _wait_idle(client: Client) -> dict:
    deadline = time.monotonic() + 30
    while True:
        mem = _memory(client)
        if mem["held"] == 0 and mem["protected"] == 0:
            return mem
        assert time.monotonic() < deadline, f"KV still held: {mem}"
        time.sleep(0.1)


def test_cancel_aborts_and_frees_kv(client):
    rid = client.send("generate", {"text": "long", "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}, "stream": True})
    replies = client.replies(rid)
    first = next(replies)
    assert first.type == "chunk"
    client.send("cancel", {"id": rid})
    mem = _wait_idle(client)
    assert mem["free"] + mem["evictable"] == mem["capacity"]


def test_vanished_client_aborts_its_stream(server):
    gone = Client(server.address)
    rid = gone.send("generate", {"text": "bye", "sampling_params": {"max_new_tokens": 900, "ignore_eos": True}, "stream": True})
    assert next(gone.replies(rid)).type == "chunk"
    gone.close()  # no cancel: the front door notices when its next chunk finds nobody
    watcher = Client(server.address)
    try:
        mem = _wait_idle(watcher)
        assert mem["free"] + mem["evictable"] == mem["capacity"]
    finally:
        watcher.close()


def test_many_clients_each_get_their_answers(server):
    clients = [Client(server.address) for _ in range(6)]
    try:
        rids = [c.send("generate", {"text": f"client {i}", "sampling_params": GREEDY}) for i, c in enumerate(clients)]
        outs = [list(c.replies(r))[-1] for c, r in zip(clients, rids)]
        assert all(o.type == "done" and o.body["meta_info"]["completion_tokens"] == 8 for o in outs)
    finally:
        for c in clients:
            c.close()


def test_no_http_needs_an_address(model_dir):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "loom", "serve", "--model", str(model_dir), "--no-http"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "--zmq-address" in out.stderr


def test_server_stops_when_its_parent_dies(model_dir, tmp_path):
    import subprocess
    import sys

    # A parent that starts a server and dies at once without shutting it down.
    script = tmp_path / "parent.py"
    script.write_text(
        "import json, sys\n"
        "from loom.runtime.entrypoints.launch import ServerProcess\n"
        f"srv = ServerProcess({str(model_dir)!r}, max_total_tokens=256)\n"
        "print(json.dumps({'pid': srv.proc.pid, 'address': srv.address}), flush=True)\n"
        "import os; os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout.strip().splitlines()[-1])
    deadline = time.monotonic() + 30
    while pathlib.Path(f"/proc/{child['pid']}").exists():
        stat = pathlib.Path(f"/proc/{child['pid']}/stat").read_text().split(")")[-1].split()[0]
        if stat == "Z":
            break
        assert time.monotonic() < deadline, "the orphaned server did not stop"
        time.sleep(0.2)
