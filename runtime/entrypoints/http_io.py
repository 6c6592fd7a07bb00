"""The HTTP plumbing every route shares: reading a JSON body (bounded in size and depth), error and
SSE responses, awaiting a result while watching for the client to leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loom.runtime.entrypoints.json_body import loads_json, too_large
from loom.runtime.protocol import RequestError, error_body

# Bodies larger than this are parsed on a worker thread, so the event loop goes on meanwhile.
PARSE_OFF_LOOP_BYTES = 1 << 20


def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, err_type), status_code=status)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or RequestError naming what is wrong with it: 415 for
    another Content-Type than application/json, 413 past `--max-request-bytes` (counted while
    the body arrives, never read whole first), 400 for invalid JSON or one nested too deep."""
    options = request.app.state.options
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"{media_type!r}" if media_type else "none"
        raise RequestError(f"send the body as JSON with `Content-Type: application/json` (got {shown})", "content-type", 415)
    limit = options.max_request_bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if len(raw) <= PARSE_OFF_LOOP_BYTES:
        return loads_json(raw, options.max_json_depth)
    return await asyncio.get_running_loop().run_in_executor(None, loads_json, raw, options.max_json_depth)


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def first_then_rest(agen: AsyncIterator[Any]) -> tuple[Any, AsyncIterator[Any]]:
    """Pull the first item now (so errors before any output become a proper status code)."""
    first = await agen.__anext__()

    async def rest() -> AsyncIterator[Any]:
        try:
            yield first
            async for item in agen:
                yield item
        finally:
            await agen.aclose()  # aborts what is unfinished when the client left

    return first, rest()


async def await_result(request: Request, agen: AsyncIterator[Any]) -> Any:
    """Await a non-streamed result; abort it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(agen.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                break
        return Response(status_code=499)  # the client went away; nobody reads this
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
        await agen.aclose()
