"""`loom serve`: the HTTP front (FastAPI + uvicorn) over `AsyncEngine`.

SGLang's native API (`/generate`, `/health`, `/health_generate`, `/get_model_info`,
`/get_server_info`, `/flush_cache`, `/abort_request`), Prometheus `/metrics`, plus the OpenAI API (`openai_api.py`).
User mistakes answer 4xx with a JSON body naming the field; a dead engine answers 503 and the
server exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loom.runtime.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.server_args import ServerArgs
from loom.runtime.protocol import RequestError, error_body

logger = logging.getLogger(__name__)

DEATH_EXIT_DELAY_S = 1.0  # let the 503 answers go out before the server stops


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


_GENERATE_KEYS = {
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "stream", "rid",
}  # fmt: skip
# Keys SGLang's clients may send that change nothing here.
_GENERATE_IGNORED = {"image_data", "lora_path", "custom_logit_processor", "bootstrap_host", "modalities", "log_metrics"}


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


def create_app(engine: AsyncEngine, api_key: str | None = None, served_model_name: str | None = None) -> FastAPI:
    app = FastAPI(title="Loom", version="0.1.0")
    app.state.engine = engine
    app.state.served_model_name = served_model_name or engine.server_args.model_path

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(ValueError)
    async def _value_error(_request: Request, exc: ValueError):
        return error_response(400, str(exc), _param_of(str(exc)))

    @app.exception_handler(EngineDeadError)
    async def _dead(_request: Request, exc: EngineDeadError):
        return error_response(503, str(exc), None, "service_unavailable")

    @app.get("/health")
    async def health():
        engine.check_alive()
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        await engine.health_generate()
        return Response(status_code=200)

    @app.get("/get_model_info")
    async def get_model_info():
        return {
            "model_path": engine.server_args.model_path,
            "tokenizer_path": engine.server_args.tokenizer_path or engine.server_args.model_path,
            "is_generation": True,
            "served_model_name": app.state.served_model_name,
            "context_length": engine.ready.context_len if engine.ready else None,
            "vocab_size": engine.ready.vocab_size if engine.ready else None,
            # What a front end needs to render chat roles itself (the language's chat roles).
            "chat_template": getattr(engine.tokenizer, "chat_template", None),
            "bos_token": getattr(engine.tokenizer, "bos_token", None),
            "eos_token": getattr(engine.tokenizer, "eos_token", None),
        }

    @app.get("/get_server_info")
    async def get_server_info():
        info = await engine.scheduler_info()
        return {
            **engine.server_args.to_dict(),
            "max_total_tokens": engine.ready.max_total_tokens,
            "context_length": engine.ready.context_len,
            "memory": info.memory,
            "stats": info.stats,
            "num_running_reqs": info.running,
            "num_waiting_reqs": info.waiting,
            "version": "0.1.0",
            "pids": {"front": os.getpid(), **engine.child_pids},
            "ipc_dir": engine.ipc_dir,
        }

    @app.get("/metrics")
    async def metrics():
        engine.metrics.set_scheduler_gauges(await engine.scheduler_info())
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        out = await engine.flush_cache()
        if out.success:
            return Response("Cache flushed.\n", status_code=200)
        return error_response(400, f"cache not flushed: {out.message}")

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await read_json(request)
        rid = body.get("rid")
        if not isinstance(rid, str) or not rid:
            raise RequestError("rid must be a non-empty string", "rid")
        found = engine.abort(rid)
        return {"success": found}

    @app.post("/generate")
    async def generate(request: Request):
        body = await read_json(request)
        unknown = set(body) - _GENERATE_KEYS - _GENERATE_IGNORED
        if unknown:
            raise RequestError(f"unknown field(s) {sorted(unknown)}; expected some of {sorted(_GENERATE_KEYS)}", sorted(unknown)[0])
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream must be a bool, got {stream!r}", "stream")
        kwargs = dict(
            prompt=body.get("text"),
            input_ids=body.get("input_ids"),
            sampling_params=body.get("sampling_params"),
            return_logprob=body.get("return_logprob", False),
            logprob_start_len=body.get("logprob_start_len"),
            top_logprobs_num=body.get("top_logprobs_num", 0),
            return_text_in_logprobs=body.get("return_text_in_logprobs", False),
            rid=body.get("rid"),
        )
        if kwargs["prompt"] is not None and kwargs["input_ids"] is not None:
            raise RequestError("give exactly one of `text` or `input_ids`", "text")
        if kwargs["prompt"] is None and kwargs["input_ids"] is None:
            raise RequestError("give one of `text` (a string or list of strings) or `input_ids`", "text")
        if not stream:
            agen = engine.generate(**kwargs)
            return await _await_result(request, agen)
        agen = engine.generate(**kwargs, stream=True)
        _first, chunks = await first_then_rest(agen)

        async def events() -> AsyncIterator[str]:
            # SGLang streams cumulative text and ids per request.
            texts: dict[int, str] = {}
            ids: dict[int, list[int]] = {}
            try:
                async for chunk in chunks:
                    i = chunk.pop("index")
                    texts[i] = texts.get(i, "") + chunk["text"]
                    ids.setdefault(i, []).extend(chunk["output_ids"])
                    chunk["text"], chunk["output_ids"] = texts[i], list(ids[i])
                    if isinstance(kwargs["prompt"], list) or (kwargs["input_ids"] and isinstance(kwargs["input_ids"][0], list)):
                        chunk["index"] = i
                    yield sse(chunk)
            except EngineDeadError as exc:
                yield sse({"error": {"message": str(exc), "code": 503}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    from loom.runtime.openai_api import add_openai_routes

    add_openai_routes(app, engine)
    return app


async def _await_result(request: Request, agen: AsyncIterator[Any]) -> Any:
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


def _param_of(message: str) -> str | None:
    """The field a ValueError message starts with ("sampling_params.top_p must ..." -> that)."""
    words = message.split(" ", 2)
    if len(words) < 2 or words[1] not in ("must", "has", "is"):
        return None
    return words[0].strip("`'\",:")


def serve(server_args: ServerArgs, host: str = "127.0.0.1", port: int = 30000, api_key: str | None = None,
          served_model_name: str | None = None, log_level: str = "warning") -> int:  # fmt: skip
    """Run the server until SIGINT/SIGTERM (-> 0) or a child process dies (-> 1)."""
    return asyncio.run(_serve(server_args, host, port, api_key, served_model_name, log_level))


async def _serve(server_args: ServerArgs, host: str, port: int, api_key: str | None, served_model_name: str | None,
                 log_level: str) -> int:  # fmt: skip
    engine = AsyncEngine(server_args, log_level=log_level)
    # A signal while the model loads stops the start-up at once.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    starting = asyncio.create_task(engine.start())
    waiting = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            return 0
        starting.result()  # raises if a child died or start-up timed out
    finally:
        waiting.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
            # uvicorn re-raises the signal it caught once it has stopped: ignore that, we clean up and exit 0.
            signal.signal(sig, lambda *_: None)
        if not starting.done() or starting.cancelled() or starting.exception() is not None:
            await engine.shutdown()
    app = create_app(engine, api_key, served_model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    def on_death(reason: str) -> None:
        asyncio.get_running_loop().call_later(DEATH_EXIT_DELAY_S, setattr, server, "should_exit", True)

    engine.on_death = on_death
    print(f"loom serve: ready on http://{host}:{port} (model {server_args.model_path})", flush=True)
    try:
        await server.serve()
    finally:
        dead = engine.dead_reason
        await engine.shutdown()
    if dead:
        logger.error("exiting: %s", dead)
        return 1
    return 0
