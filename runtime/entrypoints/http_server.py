"""`loom serve`: the HTTP front (FastAPI + uvicorn) over `AsyncEngine`.

SGLang's native API (`/generate`, `/health`, `/health_generate`, `/get_model_info`,
`/get_server_info`, `/flush_cache`, `/abort_request`), Prometheus `/metrics`, plus the OpenAI API (`openai_api.py`).
User mistakes answer 4xx with a JSON body naming the field; a dead engine answers 503 and the
server exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

import loom
from loom.runtime.entrypoints import native_api
from loom.runtime.entrypoints.http_io import ApiKeyMiddleware, await_result, error_response, first_then_rest, read_json, sse
from loom.runtime.entrypoints.openai_api import add_openai_routes
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import GenerateRequest, RequestError
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

DEATH_EXIT_DELAY_S = 1.0  # let the 503 answers go out before the server stops


def create_app(engine: AsyncEngine, api_key: str | None = None, served_model_name: str | None = None) -> FastAPI:
    app = FastAPI(title="Loom", version=loom.__version__)
    app.state.engine = engine
    app.state.served_model_name = served_model_name or engine.server_args.model_path

    if api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError):
        return error_response(exc.status, str(exc), exc.param)


    @app.exception_handler(ValueError)
    async def _value_error(_request: Request, exc: ValueError):
        # Request mistakes raise RequestError, which names its field; any other ValueError from
        # a request's handling is still the request's fault, answered 400 without a field.
        return error_response(400, str(exc))

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
        return native_api.model_info(engine, app.state.served_model_name)

    @app.get("/get_server_info")
    async def get_server_info():
        return await native_api.server_info(engine)

    @app.get("/metrics")
    async def metrics():
        engine.metrics.set_scheduler_gauges(await engine.scheduler_info())
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        await native_api.flush_cache(engine)
        return Response("Cache flushed.\n", status_code=200)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        return {"success": engine.abort(native_api.parse_abort(await read_json(request)))}

    @app.post("/generate")
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
                yield sse({"error": {"message": str(exc), "code": 503}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    add_openai_routes(app, engine)
    return app


def serve(server_args: ServerArgs, host: str = "127.0.0.1", port: int = 30000, api_key: str | None = None,
          served_model_name: str | None = None, log_level: str = "warning", zmq_address: str | None = None,
          http: bool = True, parent_pid: int | None = None) -> int:  # fmt: skip
    """Run the server until SIGINT/SIGTERM (-> 0) or a child process dies (-> 1).

    zmq_address: also bind the ZeroMQ front door there (`ipc://...` or `tcp://...`); http=False
    serves only that. parent_pid: exit when that process is gone (`loom.Runtime` sets it)."""
    return asyncio.run(_serve(server_args, host, port, api_key, served_model_name, log_level, zmq_address, http, parent_pid))


async def _serve(server_args: ServerArgs, host: str, port: int, api_key: str | None, served_model_name: str | None,
                 log_level: str, zmq_address: str | None, http: bool, parent_pid: int | None) -> int:  # fmt: skip
    if server_args.dp_size > 1:
        from loom.runtime.front.dp_router import DataParallelEngine

        engine: Any = DataParallelEngine(server_args, log_level=log_level)
    else:
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
        if http:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
                # uvicorn re-raises the signal it caught once it has stopped: ignore that, we clean up and exit 0.
                signal.signal(sig, lambda *_: None)
        if not starting.done() or starting.cancelled() or starting.exception() is not None:
            await engine.shutdown()
    served_model_name = served_model_name or server_args.model_path
    door = None
    watcher = None
    try:
        if zmq_address:
            from loom.runtime.entrypoints.front_door import FrontDoor

            door = FrontDoor(engine, zmq_address, served_model_name)
            await door.start()
        if parent_pid is not None:
            watcher = asyncio.create_task(_watch_parent(parent_pid, stopping))
        if http:
            await _serve_http(engine, host, port, api_key, served_model_name, log_level, stopping)
        else:
            engine.on_death = lambda reason: loop.call_later(DEATH_EXIT_DELAY_S, stopping.set)
            print(f"loom serve: ready on {zmq_address} (model {server_args.model_path})", flush=True)
            await stopping.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
        dead = engine.dead_reason
        if door is not None:
            await door.close()
        await engine.shutdown()
    if dead:
        logger.error("exiting: %s", dead)
        return 1
    return 0


async def _watch_parent(parent_pid: int, stopping: asyncio.Event) -> None:
    from loom.runtime.ipc import parent_gone

    while not parent_gone(parent_pid):
        await asyncio.sleep(1.0)
    logger.warning("the parent process %d is gone; stopping", parent_pid)
    stopping.set()


async def _serve_http(engine: AsyncEngine, host: str, port: int, api_key: str | None, served_model_name: str,
                      log_level: str, stopping: asyncio.Event) -> None:  # fmt: skip
    app = create_app(engine, api_key, served_model_name)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)

    def on_death(reason: str) -> None:
        asyncio.get_running_loop().call_later(DEATH_EXIT_DELAY_S, setattr, server, "should_exit", True)

    engine.on_death = on_death
    stop_task = asyncio.create_task(stopping.wait())  # a gone parent stops the HTTP server too
    stop_task.add_done_callback(lambda _t: setattr(server, "should_exit", True))
    print(f"loom serve: ready on http://{host}:{port} (model {engine.server_args.model_path})", flush=True)
    try:
        await server.serve()
    finally:
        stop_task.cancel()
