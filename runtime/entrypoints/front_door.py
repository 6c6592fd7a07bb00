"""The ZeroMQ front door: a ROUTER in the front process for programs in other processes.

`loom.Runtime` (the language's local backend) talks to it with a DEALER, no HTTP on the way. The
wire is `loom.runtime.protocol` (msgpack maps, never pickle); the answers are the native API's, the
same functions the HTTP routes call. Each request runs as its own task, so a long generation never
holds up an info query. A streamed request whose client is gone (ROUTER_MANDATORY makes the send
fail) or that the client cancels is aborted, which releases its KV memory. A frame over
`--max-request-bytes` is refused (413) before it is decoded, and a body nested deeper than
`--max-json-depth` with 400, as over HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import zmq
import zmq.asyncio

from loom.runtime.entrypoints import native_api
from loom.runtime.entrypoints.json_body import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_REQUEST_BYTES, check_depth, too_large
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import FrontReply, GenerateRequest, RequestError, decode_request, encode, error_body

logger = logging.getLogger(__name__)


class ClientGone(Exception):
    """The DEALER a reply was meant for is no longer connected."""


class FrontDoor:
    def __init__(self, engine: AsyncEngine, address: str, served_model_name: str,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, max_json_depth: int = DEFAULT_MAX_JSON_DEPTH) -> None:  # fmt: skip
        self.engine = engine
        self.address = address
        self.served_model_name = served_model_name
        self.max_request_bytes = max_request_bytes
        self.max_json_depth = max_json_depth
        self._ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: dict[tuple[bytes, str], asyncio.Task] = {}
        self._loop_task: asyncio.Task | None = None

    async def start(self) -> None:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client raises, so we can abort
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.address)
        self._sock = sock
        self._loop_task = asyncio.create_task(self._recv_loop())
        logger.info("front door listening on %s", self.address)

    async def close(self) -> None:
        for task in [*self._tasks.values(), self._loop_task]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
        self._ctx.term()

    async def _recv_loop(self) -> None:
        assert self._sock is not None
        while True:
            frames = await self._sock.recv_multipart()
            identity, data = frames[0], frames[-1]
            if len(data) > self.max_request_bytes:
                exc = too_large(self.max_request_bytes, len(data))
                await self._reply_quietly(identity, "", "error", {"status": 413, **error_body(413, str(exc), exc.param)})
                continue
            try:
                req = decode_request(data)
            except ValueError as exc:
                await self._reply_quietly(identity, "", "error", {"status": 400, **error_body(400, str(exc), "frame")})
                continue
            if req.method == "cancel":
                task = self._tasks.get((identity, str(req.body.get("id", ""))))
                if task is not None:
                    task.cancel()
                continue
            key = (identity, req.id)
            if key in self._tasks:
                await self._reply_quietly(identity, req.id, "error",
                                          {"status": 400, **error_body(400, f"request id {req.id!r} is already in use", "id")})  # fmt: skip
                continue
            task = asyncio.create_task(self._handle(identity, req.id, req.method, req.body))
            self._tasks[key] = task
            task.add_done_callback(lambda _t, key=key: self._tasks.pop(key, None))

    async def _handle(self, identity: bytes, rid: str, method: str, body: dict[str, Any]) -> None:
        try:
            try:
                await self._dispatch(identity, rid, method, body)
            except (ValueError, EngineDeadError) as exc:
                if method == "generate":
                    self.engine.metrics.count_refused(exc)
                if isinstance(exc, RequestError):
                    await self._send(identity, rid, "error", {"status": exc.status, **error_body(exc.status, str(exc), exc.param)})
                elif isinstance(exc, ValueError):
                    await self._send(identity, rid, "error", {"status": 400, **error_body(400, str(exc))})
                else:
                    await self._send(identity, rid, "error", {"status": 503, **error_body(503, str(exc), None, "service_unavailable")})
            except (ClientGone, asyncio.CancelledError):
                raise
            except Exception as exc:  # a bug must not take the front door down with it
                logger.exception("front door: %s failed", method)
                await self._send(identity, rid, "error", {"status": 500, **error_body(500, f"internal error: {type(exc).__name__}: {exc}")})
        except (ClientGone, asyncio.CancelledError):
            logger.info("front door: the client of %s %r left; its request was aborted", method, rid)

    async def _dispatch(self, identity: bytes, rid: str, method: str, body: dict[str, Any]) -> None:
        engine = self.engine
        if method == "generate":
            check_depth(body, self.max_json_depth)
            req = GenerateRequest.from_body(body)
            agen = engine.generate(req)
            try:
                if not req.stream:
                    await self._send(identity, rid, "done", await agen.__anext__())
                    return
                async for chunk in agen:  # deltas, with the item's `index`
                    await self._send(identity, rid, "chunk", chunk)
                await self._send(identity, rid, "done", None)
            finally:
                await agen.aclose()  # aborts whatever is unfinished (a cancel, a vanished client)
        elif method == "abort_request":
            await self._send(identity, rid, "done", {"success": engine.abort(native_api.parse_abort(body))})
        elif method == "get_model_info":
            await self._send(identity, rid, "done", native_api.model_info(engine, self.served_model_name))
        elif method == "get_server_info":
            await self._send(identity, rid, "done", await native_api.server_info(engine))
        elif method == "flush_cache":
            await native_api.flush_cache(engine)
            await self._send(identity, rid, "done", {"success": True})
        elif method == "health":
            engine.check_alive()
            await self._send(identity, rid, "done", {"ok": True})
        else:
            raise RequestError(f"unknown method {method!r}; expected one of generate, cancel, abort_request, "
                               "get_model_info, get_server_info, flush_cache, health", "method")  # fmt: skip

    async def _send(self, identity: bytes, rid: str, kind: str, body: Any) -> None:
        assert self._sock is not None
        try:
            await self._sock.send_multipart([identity, encode(FrontReply(rid, kind, body))])
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                raise ClientGone from None
            raise

    async def _reply_quietly(self, identity: bytes, rid: str, kind: str, body: Any) -> None:
        try:
            await self._send(identity, rid, kind, body)
        except ClientGone:
            pass
