"""The client-facing wire of the ZeroMQ front door (DEALER -> ROUTER), shared with `loom.lang`.

No torch, no runtime imports: the language imports this module alone. Messages are msgpack maps
(msgspec), one frame each; nothing is ever unpickled.

    client -> front   FrontRequest(id, method, body)
    front  -> client  FrontReply(id, type, body)    type: "chunk" | "done" | "error"

Methods and their bodies mirror the HTTP routes of the native API, so a program behaves the same
over either path:

    generate         body = the JSON body of POST /generate (text or input_ids, single or batch,
                     sampling_params, logprob options, stream). Not streamed: one "done" whose body
                     is what /generate answers. Streamed: "chunk"s of new text and output_ids
                     (deltas, with the request's `index` in the answer), then a "done" with
                     body None. Only SGLang's HTTP /generate turns them into cumulative text.
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
from dataclasses import dataclass, field, fields
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
    """Raises ValueError naming what is wrong with a frame that is not a FrontRequest (also one
    nested too deeply to decode)."""
    try:
        return _request_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a FrontRequest ({{id, method, body}} as msgpack): {exc}") from None
    except RecursionError:  # a body nested thousands deep
        raise ValueError("the FrontRequest nests too deeply to decode") from None


def decode_reply(data: bytes) -> FrontReply:
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a FrontReply ({{id, type, body}} as msgpack): {exc}") from None
    except RecursionError:
        raise ValueError("the FrontReply nests too deeply to decode") from None


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


MAX_N = 128  # the most samples `sampling_params.n` may ask for one prompt
# The most requests one call may become (prompts times samples): a 16 MiB body of one-character
# prompts would otherwise be millions of requests, tokenized and queued before anyone else's.
MAX_ITEMS_PER_CALL = 4096

# Keys SGLang clients may send in a /generate body that mean nothing for a text-only engine:
# accepted and ignored.
IGNORED_GENERATE_KEYS = frozenset(
    {"image_data", "lora_path", "custom_logit_processor", "bootstrap_host", "modalities", "log_metrics"}
)


_FLAGS = ("stream", "reject_invalid", "return_text_in_logprobs")  # GenerateRequest's plain bools


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(slots=True)
class GenerateItem:
    """One prompt's request, cut from a `GenerateRequest`: its own sampling parameters (`n` is 1
    here: each sample is an item) and logprob options, and its `index` in the answer."""

    index: int
    where: str  # the prompt as errors name it: "text", "prompt[2]", "input_ids[0]"
    text: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any]
    return_logprob: bool = False
    logprob_start_len: int | None = None
    top_logprobs_num: int = 0
    rid: str | None = None


@dataclass(slots=True)
class GenerateRequest:
    """One generate call, as every entry point receives it: `loom.Engine.generate`, the /generate
    and OpenAI routes, the front door. A single prompt or a batch (`text` / `input_ids` a list);
    every other field is one value for all prompts or, for a batch, a list with one per prompt.

    `items()` is the one place where that shape is resolved: batch or not, per-prompt values, and
    `sampling_params.n` > 1 fanned out into n items of one sample each. The answer is a list
    (`answers_list()`) for a batch or for n > 1, in the order of `items()`, else one result."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any] | None] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    # Loom's own: False keeps a refused request (an invalid grammar) as that request's result, with
    # an abort finish_reason (loom.Engine), instead of failing the whole call with a 400.
    reject_invalid: bool = True
    # What the caller calls `text` in its messages: "prompt" for the Engine API. Not sent.
    text_name: str = field(default="text", repr=False, compare=False)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> GenerateRequest:
        """A /generate JSON body (or the front door's generate body). RequestError names an unknown
        field; the values are checked by `items()` and the tokenizer manager."""
        fields_ = set(GENERATE_KEYS)
        unknown = set(body) - fields_ - IGNORED_GENERATE_KEYS
        if unknown:
            first = sorted(unknown)[0]
            raise RequestError(f"unknown field(s) {sorted(unknown)}; expected some of {sorted(fields_)}", first)
        known = {k: v for k, v in body.items() if k in fields_ and not (v is None and k in _FLAGS)}  # null: the default
        for flag in _FLAGS:
            if flag in known and not isinstance(known[flag], bool):
                raise RequestError(f"{flag} must be a bool, got {known[flag]!r}", flag)
        defaults = {"return_logprob": False, "top_logprobs_num": 0}
        return cls(**{k: (defaults.get(k) if v is None and k in defaults else v) for k, v in known.items()})

    def to_body(self) -> dict[str, Any]:
        """The JSON body of this request, as /generate and the front door take it (`from_body`'s inverse)."""
        body = {k: getattr(self, k) for k in GENERATE_KEYS}
        return {k: v for k, v in body.items() if v is not None or k in ("sampling_params",)}

    @property
    def is_batch(self) -> bool:
        """`text` is a list, or `input_ids` a list of lists."""
        ids = self.input_ids
        return isinstance(self.text, list) or (isinstance(ids, list) and bool(ids) and isinstance(ids[0], list))

    def answers_list(self) -> bool:
        """Whether the answer is a list: a batch, or a single prompt with n > 1."""
        return self.is_batch or len(self.items()) > 1

    def items(self) -> list[GenerateItem]:
        """One item per prompt and sample. RequestError names the field that is wrong with the
        request's shape (the values themselves are checked where the model is known)."""
        name = self.text_name
        if (self.text is None) == (self.input_ids is None):
            raise RequestError(f"give exactly one of `{name}` (text) or `input_ids` (token ids)", name)
        batch = self.is_batch
        if self.text is not None:
            texts = self.text if batch else [self.text]
            if batch and not texts:
                raise RequestError(f"{name} must be a non-empty string or a non-empty list of strings, got []", name)
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    where = f"{name}[{i}]" if batch else name
                    raise RequestError(f"{where} must be a string, got {type(t).__name__}", name)
            prompts: list[Any] = list(texts)
        else:
            if not isinstance(self.input_ids, list):
                raise RequestError(f"input_ids must be a list of token ids, got {type(self.input_ids).__name__}", "input_ids")
            prompts = list(self.input_ids) if batch else [self.input_ids]
            for i, ids in enumerate(prompts):
                if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                    raise RequestError(f"{f'input_ids[{i}]' if batch else 'input_ids'} must be a list of ints", "input_ids")
        field_name = name if self.text is not None else "input_ids"
        n = len(prompts)
        params = self._per_prompt("sampling_params", self.sampling_params, n, batch, None)
        flags = self._per_prompt("return_logprob", self.return_logprob, n, batch, False)
        starts = self._per_prompt("logprob_start_len", self.logprob_start_len, n, batch, None)
        tops = self._per_prompt("top_logprobs_num", self.top_logprobs_num, n, batch, 0)
        rids = self._per_prompt("rid", self.rid, n, batch, None)
        items: list[GenerateItem] = []
        for i, prompt in enumerate(prompts):
            p = params[i]
            if p is not None and not isinstance(p, dict):
                raise RequestError(f"sampling_params must be a dict, got {type(p).__name__}", "sampling_params")
            copies = 1 if p is None or p.get("n") is None else p["n"]
            if not _is_int(copies) or not 1 <= copies <= MAX_N:
                raise RequestError(f"sampling_params.n must be an int in [1, {MAX_N}], got {copies!r}", "sampling_params.n")
            if copies > 1 and rids[i] is not None:
                raise RequestError("rid cannot be given with sampling_params.n > 1 (each sample is its own request)", "rid")
            one = {k: v for k, v in (p or {}).items() if k != "n"}
            if len(items) + copies > MAX_ITEMS_PER_CALL:
                raise RequestError(
                    f"one call may ask for at most {MAX_ITEMS_PER_CALL} completions (prompts times n); "
                    f"this one asks for more ({n} prompts)", field_name
                )  # fmt: skip
            for _ in range(copies):
                items.append(GenerateItem(
                    index=len(items), where=f"{field_name}[{i}]" if batch else field_name,
                    text=prompt if self.text is not None else None,
                    input_ids=prompt if self.text is None else None, sampling_params=dict(one),
                    return_logprob=flags[i], logprob_start_len=starts[i], top_logprobs_num=tops[i], rid=rids[i],
                ))  # fmt: skip
        return items

    @staticmethod
    def _per_prompt(name: str, value: Any, n: int, batch: bool, default: Any) -> list[Any]:
        """A scalar (or one dict of sampling params) applies to every prompt; a list gives one
        entry per prompt (a list of one dict also fits a single prompt)."""
        if value is None:
            return [default] * n
        if not isinstance(value, list):
            return [value] * n
        if not batch and name != "sampling_params":
            raise RequestError(f"{name} must be a single value for a single prompt, got a list", name)
        if len(value) != n:
            raise RequestError(f"{name} has {len(value)} entries but there are {n} prompts", name)
        return list(value)


GENERATE_KEYS = tuple(f.name for f in fields(GenerateRequest) if f.name != "text_name")


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
