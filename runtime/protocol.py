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
