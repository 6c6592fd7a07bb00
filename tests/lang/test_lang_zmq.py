"""`ZmqEndpoint`: the language over the ZeroMQ front door. First against a tiny fake ROUTER
(the wire contract, errors, streaming), then against the real front door of a `loom serve` child
started as `loom.Runtime` starts it (`loom.runtime.entrypoints.launch.ServerProcess`)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

import loom as sgl
from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.protocol import FrontReply, RequestError, decode_request, encode, error_body

GREEDY = {"temperature": 0.0}


class FakeFrontDoor:
    """A ROUTER answering like the front door: a fixed model info, generate echoing a completion
    of "!" per requested token (streamed one new "!" per chunk), a 400 for a bad regex."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.bind(address)
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, identity: bytes, rid: str, kind: str, body: Any) -> None:
        self.sock.send_multipart([identity, encode(FrontReply(rid, kind, body))])

    @staticmethod
    def _result(text: str, n: int) -> dict[str, Any]:
        return {"text": "!" * n, "output_ids": [7] * n,
                "meta_info": {"prompt_tokens": len(text), "completion_tokens": n, "cached_tokens": 0}}  # fmt: skip

    def _serve(self) -> None:
        while not self._stop:
            if not self.sock.poll(50):
                continue
            identity, data = self.sock.recv_multipart()
            req = decode_request(data)
            self.requests.append((req.method, req.body))
            if req.method == "get_model_info":
                self._send(identity, req.id, "done", {"model_path": "fake", "chat_template": None})
            elif req.method == "generate":
                params = req.body.get("sampling_params", {})
                n = params.get("max_new_tokens", 3)
                if params.get("regex") == "(":
                    self._send(identity, req.id, "error", {"status": 400, **error_body(400, "regex '(' cannot be compiled", "regex")})
                elif req.body.get("stream"):  # deltas: one new "!" per chunk
                    for i in range(1, n + 1):
                        chunk = {**self._result(req.body["text"], 1), "index": 0}
                        chunk["meta_info"]["completion_tokens"] = i
                        self._send(identity, req.id, "chunk", chunk)
                    self._send(identity, req.id, "done", None)
                else:
                    self._send(identity, req.id, "done", self._result(req.body["text"], n))
            elif req.method == "flush_cache":
                self._send(identity, req.id, "done", {"success": True})

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def fake(tmp_path) -> Iterator[FakeFrontDoor]:
    door = FakeFrontDoor(f"ipc://{tmp_path}/front")
    yield door
    door.close()


def test_zmq_endpoint_speaks_the_front_door_protocol(fake, tmp_path) -> None:
    backend = sgl.ZmqEndpoint(f"ipc://{tmp_path}/front")
    try:
        @sgl.function
        def prog(s):
            s += sgl.user("Hi")  # no chat template reported: plain "USER: " roles
            s += "A:" + sgl.gen("x", max_tokens=4, stop="\n")

        state = prog.run(backend=backend, **GREEDY)
        assert state.text() == "USER: Hi\nA:!!!!"
        method, body = fake.requests[-1]
        assert method == "generate" and body["text"] == "USER: Hi\nA:"
        assert body["sampling_params"]["max_new_tokens"] == 4 and body["sampling_params"]["stop"] == ["\n"]

        streamed = prog.run(backend=backend, stream=True)
        assert list(streamed.text_iter("x")) == ["!"] * 4  # one piece per chunk

        @sgl.function
        def bad(s):
            s += "A:" + sgl.gen("x", regex="(")

        err = bad.run(backend=backend).error()
        assert isinstance(err, RequestError) and err.param == "regex" and err.status == 400
        sgl.flush_cache(backend)
        assert fake.requests[-1][0] == "flush_cache"
    finally:
        backend.shutdown()


def test_zmq_endpoint_rejects_a_non_zmq_address() -> None:
    with pytest.raises(ValueError, match="ZeroMQ endpoint"):
        sgl.ZmqEndpoint("http://127.0.0.1:30000")


@pytest.fixture(scope="module")
def front_door(tmp_path_factory) -> Iterator[Any]:
    from loom.runtime.entrypoints.launch import ServerProcess

    model = build_tiny_checkpoint(tmp_path_factory.mktemp("lang-zmq"), arch="llama", vocab_size=512, seed=3)
    proc = ServerProcess(model, max_total_tokens=2048)
    try:
        yield proc
    finally:
        proc.shutdown()


def test_programs_over_the_real_front_door(front_door) -> None:
    backend = sgl.ZmqEndpoint(front_door.address, is_dead=lambda: None if front_door.proc.poll() is None else "server exited")
    try:
        @sgl.function
        def prog(s):
            s += sgl.system("Be brief.") + sgl.user("Pick a color.")
            with s.assistant():
                s += "I pick" + sgl.select("color", [" blue", " red"]) + "." + sgl.gen("why", max_tokens=4, ignore_eos=True)
            forks = s.fork(2)
            forks += sgl.gen("more", max_tokens=3, ignore_eos=True)
            forks.join()

        state = prog.run(backend=backend, **GREEDY)
        assert state.error() is None
        assert state["color"] in (" blue", " red")
        assert state.messages()[-1] == {"role": "assistant", "content": "I pick" + state["color"] + "." + state["why"]}
        assert state["more"][0] == state["more"][1]  # greedy branches agree
        assert all(m["cached_tokens"] > 0 for m in state.get_meta_info("more")["forks"])
        streamed = prog.run(backend=backend, stream=True, **GREEDY)
        assert "".join(streamed.text_iter()) == state.text()
    finally:
        backend.shutdown()
