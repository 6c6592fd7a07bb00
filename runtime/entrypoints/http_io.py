"""The HTTP plumbing every route shares: reading a JSON body, error and SSE responses, awaiting a
result while watching for the client to leave, and the API-key check."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from loom.runtime.protocol import RequestError, error_body


def error_response(status: int, message: str, param: str | None = None, err_type: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, err_type), status_code=status)


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or RequestError naming what is wrong with it."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", "body") from exc
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", "body")
    return body


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


class ApiKeyMiddleware:
    """401 for every HTTP route but /health without `Authorization: Bearer KEY`.

    A plain ASGI middleware (not BaseHTTPMiddleware), so routes still see client disconnects."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            header = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(header, self.expected):
                response = error_response(
                    401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authorization", "authentication_error"
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
