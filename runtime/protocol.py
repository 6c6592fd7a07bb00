"""The client-facing wire of the ZeroMQ front door (DEALER -> ROUTER), shared with `loom.lang`.

No torch, no runtime imports: the language imports this module alone. Messages are msgpack maps
(msgspec), one frame each; nothing is ever unpickled.

    client -> front   FrontRequest(id, method, body)
    front  -> client  FrontReply(id, type, body)    type: "chunk" | "done" | "error"

Methods and their bodies mirror the HTTP routes of the native API, so a program behaves the same
over either path:

    generate         body = the JSON body of POST /generate (text or input_ids, single or batch,
                     sampling_params, logprob options, stream). Not streamed: one "done" whose body
                     is what /generate answers. Streamed: one "chunk" per SSE event (cumulative
                     text and output_ids, as SGLang streams them), then a "done" with body None.
    cancel           body = {"id": <id of an earlier generate>}: the client stopped listening; the
                     request is aborted and its KV released. Answered with nothing.
    abort_request    body = {"rid": ...}, as POST /abort_request.
    get_model_info, get_server_info, flush_cache, health: body {}, answered like their routes.

An "error" reply ends its request; its body is {"status": <HTTP-like code>, "error": {"message",
"type", "param", "code"}} exactly as the HTTP error responses carry it. Status 503 means the
engine is gone.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Literal

import msgspec

METHODS = ("generate", "cancel", "abort_request", "get_model_info", "get_server_info", "flush_cache", "health")
REPLY_TYPES = ("chunk", "done", "error")


class FrontRequest(msgspec.Struct, frozen=True):
    id: str
    method: str
    body: dict[str, Any] = {}


class FrontReply(msgspec.Struct, frozen=True):
    id: str
    type: Literal["chunk", "done", "error"]
    body: Any = None


_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(FrontRequest)
_reply_decoder = msgspec.msgpack.Decoder(FrontReply)


def encode(msg: FrontRequest | FrontReply) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> FrontRequest:
    """Raises ValueError naming what is wrong with a frame that is not a FrontRequest."""
    try:
        return _request_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a FrontRequest ({{id, method, body}} as msgpack): {exc}") from None


def decode_reply(data: bytes) -> FrontReply:
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a FrontReply ({{id, type, body}} as msgpack): {exc}") from None


class RequestError(ValueError):
    """A client mistake: answered with `status` (HTTP-like) and a message naming the field `param`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def error_body(status: int, message: str, param: str | None = None, err_type: str | None = None) -> dict[str, Any]:
    """The error JSON the HTTP server and the front door both send."""
    err_type = err_type or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


class ServerError(RuntimeError):
    """The server could not answer (5xx; 503: the engine is gone, or the server process died)."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


def raise_for_error(body: Any) -> None:
    """An "error" reply's body -> RequestError (4xx, names the field) or ServerError (5xx)."""
    status = int(body.get("status", 500)) if isinstance(body, dict) else 500
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = str(err.get("message", body))
    if 400 <= status < 500:
        raise RequestError(message, err.get("param"), status)
    raise ServerError(message, status)


class FrontDoorClient:
    """A thread-safe blocking client of the front door.

    ZeroMQ sockets belong to one thread, so one I/O thread owns the DEALER: callers hand it frames
    through a queue and wait on their own reply queue. `is_dead` (optional) is polled while waiting,
    so a server process that vanished fails the call instead of hanging it.
    """

    POLL_S = 0.2

    def __init__(self, address: str, is_dead: Callable[[], str | None] | None = None) -> None:
        import zmq

        self.address = address
        self.is_dead = is_dead
        self._zmq = zmq
        self._ctx = zmq.Context()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._wake_send = self._ctx.socket(zmq.PAIR)
        self._wake_recv = self._ctx.socket(zmq.PAIR)
        wake = f"inproc://loom-front-client-{uuid.uuid4().hex}"
        self._wake_recv.bind(wake)
        self._wake_send.connect(wake)
        self._wake_lock = threading.Lock()
        self._waiters: dict[str, queue.SimpleQueue[FrontReply]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._io_loop, name="loom-front-client", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- calls
    def call(self, method: str, body: dict[str, Any] | None = None) -> Any:
        """One request, its "done" body. Raises RequestError / ServerError."""
        for reply in self._exchange(method, body or {}):
            if reply.type == "done":
                return reply.body
        raise ServerError("the front door ended the request without an answer", 500)

    def stream(self, method: str, body: dict[str, Any]) -> Iterator[Any]:
        """The "chunk" bodies of one request. Closing the iterator early cancels the request."""
        for reply in self._exchange(method, body):
            if reply.type == "chunk":
                yield reply.body

    def _exchange(self, method: str, body: dict[str, Any]) -> Iterator[FrontReply]:
        rid = uuid.uuid4().hex
        replies: queue.SimpleQueue[FrontReply] = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                raise ServerError("this client is closed")
            self._waiters[rid] = replies
        finished = False
        try:
            self._post(encode(FrontRequest(rid, method, body)))
            while True:
                try:
                    reply = replies.get(timeout=self.POLL_S)
                except queue.Empty:
                    reason = self.is_dead() if self.is_dead else None
                    if reason or self._closed:
                        finished = True
                        raise ServerError(reason or "this client is closed") from None
                    continue
                if reply.type == "error":
                    finished = True
                    raise_for_error(reply.body)
                finished = reply.type == "done"
                yield reply
                if finished:
                    return
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
            if not finished and not self._closed:
                self._post(encode(FrontRequest(uuid.uuid4().hex, "cancel", {"id": rid})))

    def _post(self, frame: bytes) -> None:
        self._outbox.put(frame)
        with self._wake_lock:
            self._wake_send.send(b"")

    # -------------------------------------------------------------- the I/O thread
    def _io_loop(self) -> None:
        zmq = self._zmq
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_recv, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._wake_recv in events:
                    self._wake_recv.recv()
                    while True:
                        try:
                            frame = self._outbox.get_nowait()
                        except queue.Empty:
                            break
                        if frame is None:
                            return
                        sock.send(frame)
                if sock in events:
                    try:
                        reply = decode_reply(sock.recv())
                    except ValueError:
                        continue  # not ours to answer; the waiter times out on a dead server
                    with self._lock:
                        waiter = self._waiters.get(reply.id)
                    if waiter is not None:
                        waiter.put(reply)
        finally:
            sock.close()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._post(None)  # type: ignore[arg-type]
        self._thread.join(5)
        with self._wake_lock:
            self._wake_send.close()
        self._wake_recv.close()
        self._ctx.term()
