"""`loom serve`: the HTTP front (FastAPI + uvicorn) over `AsyncEngine`.

SGLang's native API (`/generate`, `/health`, `/health_generate`, `/get_model_info`,
`/get_server_info`, `/flush_cache`, `/abort_request`), Prometheus `/metrics`, plus the OpenAI API (`openai_api.py`).
Every request first passes `http_guard.HttpGuard` (Host, Origin, API key, size limit, shutdown).
User mistakes answer 4xx with a JSON body naming the field; a dead engine answers 503 and the
server exits non-zero. SIGTERM (or SIGINT) stops admitting, lets running requests finish for
`--shutdown-grace-s`, then answers those still running with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import loom
from loom.runtime.entrypoints import native_api
from loom.runtime.entrypoints.api_schema import add_request_schemas, request_body
from loom.runtime.entrypoints.http_guard import GENERATION_PATHS, Admission, HttpGuard
from loom.runtime.entrypoints.http_io import await_result, error_response, first_then_rest, read_json, sse
from loom.runtime.entrypoints.http_options import HttpOptions
from loom.runtime.entrypoints.openai_api import add_openai_routes
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import GenerateRequest, RequestError
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

DEATH_EXIT_DELAY_S = 1.0  # let the 503 answers go out before the server stops
ANSWER_OUT_S = 2.0  # after the grace period: time for the 503 answers to be written
SHUTTING_DOWN = "the server is shutting down"


def create_app(engine: AsyncEngine, options: HttpOptions | None = None, served_model_name: str | None = None,
               bind_host: str = "127.0.0.1") -> FastAPI:  # fmt: skip
    options = options or HttpOptions()
    app = FastAPI(title="Loom", version=loom.__version__)
    app.state.engine = engine
    app.state.options = options
    app.state.admission = Admission()
    app.state.served_model_name = served_model_name or engine.server_args.model_path
    app.add_middleware(HttpGuard, options=options, bind_host=bind_host, admission=app.state.admission,
                       on_refused=lambda _path: engine.metrics.count_refused())  # fmt: skip
    if options.allowed_origins:  # outside the guard: preflights are answered, and its errors carry CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(options.allowed_origins), allow_methods=["GET", "POST", "HEAD"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip

    def refused(request: Request, exc: BaseException) -> None:
        if request.url.path in GENERATION_PATHS:
            engine.metrics.count_refused(exc)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        refused(request, exc)
        return error_response(exc.status, str(exc), exc.param)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError):
        # Request mistakes raise RequestError, which names its field; any other ValueError from
        # a request's handling is still the request's fault, answered 400 without a field.
        refused(request, exc)
        return error_response(400, str(exc))

    @app.exception_handler(EngineDeadError)
    async def _dead(request: Request, exc: EngineDeadError):
        refused(request, exc)
        return error_response(503, str(exc), None, "service_unavailable")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        response = error_response(exc.status_code, str(exc.detail))  # 404, 405: in the same JSON shape
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        logger.exception("internal error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

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
        return native_api.model_info(engine, app.state.served_model_name)

    @app.get("/get_server_info")
    async def get_server_info():
        return await native_api.server_info(engine)

    @app.get("/metrics")
    async def metrics():
        engine.metrics.set_scheduler_gauges(await engine.scheduler_info())
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/flush_cache")  # it changes state: POST only (GET answers 405)
    async def flush_cache():
        await native_api.flush_cache(engine)
        return Response("Cache flushed.\n", status_code=200)

    @app.post("/abort_request", openapi_extra=request_body("AbortBody"))
    async def abort_request(request: Request):
        return {"success": engine.abort(native_api.parse_abort(await read_json(request)))}

    @app.post("/generate", openapi_extra=request_body("GenerateBody"))
    async def generate(request: Request):
        req = GenerateRequest.from_body(await read_json(request))
        if not req.stream:
            return await await_result(request, engine.generate(req))
        _first, chunks = await first_then_rest(engine.generate(req))
        numbered = req.answers_list()

        async def events() -> AsyncIterator[str]:
            try:
                async for chunk in native_api.cumulative_chunks(chunks, numbered):
                    yield sse(chunk)
            except EngineDeadError as exc:
                yield sse({"error": {"message": str(exc), "type": "service_unavailable", "code": 503}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    add_openai_routes(app, engine)
    add_request_schemas(app)
    return app


def serve(server_args: ServerArgs, host: str = "127.0.0.1", port: int = 30000, options: HttpOptions | None = None,
          served_model_name: str | None = None, log_level: str = "warning", zmq_address: str | None = None,
          http: bool = True, parent_pid: int | None = None) -> int:  # fmt: skip
    """Run the server until SIGINT/SIGTERM (-> 0) or a child process dies (-> 1).

    options: the HTTP front's own flags (API key, limits, Host/Origin checks, shutdown grace).
    zmq_address: also bind the ZeroMQ front door there (`ipc://...` or `tcp://...`); http=False
    serves only that. parent_pid: exit when that process is gone (`loom.Runtime` sets it)."""
    options = options or HttpOptions()
    return asyncio.run(_serve(server_args, host, port, options, served_model_name, log_level, zmq_address, http, parent_pid))


class _Stop:
    """The first SIGTERM/SIGINT (or a gone parent) asks for a graceful stop; a second one cuts
    the grace period short."""

    def __init__(self) -> None:
        self.requested = asyncio.Event()
        self.hurry = asyncio.Event()

    def __call__(self) -> None:
        if self.requested.is_set():
            self.hurry.set()
        self.requested.set()


async def _serve(server_args: ServerArgs, host: str, port: int, options: HttpOptions, served_model_name: str | None,
                 log_level: str, zmq_address: str | None, http: bool, parent_pid: int | None) -> int:  # fmt: skip
    if server_args.dp_size > 1:
        from loom.runtime.front.dp_router import DataParallelEngine

        engine: Any = DataParallelEngine(server_args, log_level=log_level)
    else:
        engine = AsyncEngine(server_args, log_level=log_level)
    # A signal while the model loads stops the start-up at once; afterwards it stops the server gracefully.
    loop = asyncio.get_running_loop()
    stop = _Stop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    starting = asyncio.create_task(engine.start())
    waiting = asyncio.create_task(stop.requested.wait())
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.wait({starting})
            return 0
        starting.result()  # raises if a child died or start-up timed out
    finally:
        waiting.cancel()
        if not starting.done() or starting.cancelled() or starting.exception() is not None:
            await engine.shutdown()
    served_model_name = served_model_name or server_args.model_path
    door = None
    watcher = None
    try:
        if zmq_address:
            from loom.runtime.entrypoints.front_door import FrontDoor

            door = FrontDoor(engine, zmq_address, served_model_name, options.max_request_bytes, options.max_json_depth)
            await door.start()
        if parent_pid is not None:
            watcher = asyncio.create_task(_watch_parent(parent_pid, stop))
        if http:
            await _serve_http(engine, host, port, options, served_model_name, log_level, stop)
        else:
            engine.on_death = lambda reason: loop.call_later(DEATH_EXIT_DELAY_S, stop.requested.set)
            print(f"loom serve: ready on {zmq_address} (model {server_args.model_path})", flush=True)
            await stop.requested.wait()
            if not engine.dead_reason:
                await _drain(engine, None, options.shutdown_grace_s, stop.hurry)
    finally:
        if watcher is not None:
            watcher.cancel()
        dead = engine.dead_reason
        if door is not None:
            await door.close()
        await engine.shutdown()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if dead:
        logger.error("exiting: %s", dead)
        return 1
    return 0


async def _watch_parent(parent_pid: int, stop: _Stop) -> None:
    from loom.runtime.ipc import parent_gone

    while not parent_gone(parent_pid):
        await asyncio.sleep(1.0)
    logger.warning("the parent process %d is gone; stopping", parent_pid)
    stop()


async def _drain(engine: Any, admission: Admission | None, grace_s: float, hurry: asyncio.Event) -> None:
    """Stop admitting (503), wait up to `grace_s` for what runs, then end the rest with 503."""
    engine.stop_admitting(SHUTTING_DOWN)
    if admission is not None:
        admission.closing = SHUTTING_DOWN

    def busy() -> bool:
        return bool(engine.num_running or (admission is not None and admission.in_flight))

    deadline = time.monotonic() + grace_s
    while busy() and time.monotonic() < deadline and not hurry.is_set():
        await asyncio.sleep(0.05)
    if engine.num_running:
        engine.abort_all(f"{SHUTTING_DOWN}: the request did not finish within the {grace_s:g}s grace period")
    deadline = time.monotonic() + ANSWER_OUT_S
    while admission is not None and admission.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


class _UvicornServer(uvicorn.Server):
    """uvicorn without its own signal handlers: `_serve` owns SIGTERM and SIGINT, to drain first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        pass


async def _serve_http(engine: AsyncEngine, host: str, port: int, options: HttpOptions, served_model_name: str,
                      log_level: str, stop: _Stop) -> None:  # fmt: skip
    app = create_app(engine, options, served_model_name, host)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=3)
    server = _UvicornServer(config)

    def on_death(reason: str) -> None:
        asyncio.get_running_loop().call_later(DEATH_EXIT_DELAY_S, setattr, server, "should_exit", True)

    engine.on_death = on_death
    print(f"loom serve: ready on http://{host}:{port} (model {engine.server_args.model_path})", flush=True)
    serving = asyncio.create_task(server.serve())
    stopping = asyncio.create_task(stop.requested.wait())
    try:
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if stopping.done() and not serving.done():
            if not engine.dead_reason:
                await _drain(engine, app.state.admission, options.shutdown_grace_s, stop.hurry)
            server.should_exit = True
        await serving
    finally:
        stopping.cancel()
