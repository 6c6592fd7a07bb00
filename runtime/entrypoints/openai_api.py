"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Each request is checked and mapped onto Loom's sampling params by `openai_params.py` (SGLang's
extras such as `top_k`, `min_p`, `ignore_eos` come through `extra_body`) and run by `AsyncEngine`;
`n > 1` runs n requests. Errors name the OpenAI field, also those Loom's own layers find.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from loom.runtime.entrypoints import openai_params as op
from loom.runtime.entrypoints.api_schema import request_body
from loom.runtime.entrypoints.http_io import await_result, first_then_rest, read_json, sse
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import GenerateRequest, RequestError

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def _usage(results: list[dict], n: int) -> dict[str, Any]:
    prompt = sum(r["meta_info"]["prompt_tokens"] for r in results[::n])
    cached = sum(r["meta_info"]["cached_tokens"] for r in results[::n])
    completion = sum(r["meta_info"]["completion_tokens"] for r in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _finish(meta: dict) -> str | None:
    reason = meta.get("finish_reason")
    return None if reason is None else _FINISH.get(reason["type"], reason["type"])


def _token_text(engine: AsyncEngine, token: int) -> str:
    return engine.tokenizer.decode([token])


def add_openai_routes(app: FastAPI, engine: AsyncEngine) -> None:
    def check_model(body: dict) -> str:
        model = body.get("model")
        names = {app.state.served_model_name, engine.server_args.model_path}
        if model is None:
            return app.state.served_model_name
        if model not in names:
            raise RequestError(f"unknown model {model!r}; this server serves {app.state.served_model_name!r}", "model", 404)
        return model

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {
            "object": "list",
            "data": [
                {
                    "id": app.state.served_model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "loom",
                    "root": engine.server_args.model_path,
                    "max_model_len": engine.ready.context_len,
                }
            ],
        }

    async def run(request: Request, body: dict, prompts: list[Any], params: dict, n: int, logprobs: int | None,
                  kind: str, model: str, stream: bool):  # fmt: skip
        """Run len(prompts) * n requests; answer (or stream) in OpenAI's shape for `kind`."""
        ids_mode = bool(prompts) and isinstance(prompts[0], list)
        req = GenerateRequest(
            text=None if ids_mode else prompts, input_ids=prompts if ids_mode else None,
            sampling_params={**params, "n": n},  # each prompt's n samples next to each other
            return_logprob=logprobs is not None, top_logprobs_num=logprobs or 0, stream=stream,
            rid=body.get("rid"), text_name="messages" if kind == "chat" else "prompt",
        )  # fmt: skip
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not stream:
            results = await await_result(request, engine.generate(req))
            if not isinstance(results, list):
                return results  # the client went away
            choices = []
            for i, r in enumerate(results):
                meta = r["meta_info"]
                choice: dict[str, Any] = {"index": i, "finish_reason": _finish(meta)}
                if kind == "chat":
                    choice["message"] = {"role": "assistant", "content": r["text"]}
                    choice["logprobs"] = _chat_logprobs(engine, meta) if logprobs is not None else None
                else:
                    choice["text"] = r["text"]
                    choice["logprobs"] = _completion_logprobs(engine, meta) if logprobs is not None else None
                choices.append(choice)
            return {"id": rid, "object": obj, "created": created, "model": model, "choices": choices,
                    "usage": _usage(results, n)}  # fmt: skip

        agen = engine.generate(req)
        _first, chunks = await first_then_rest(agen)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> AsyncIterator[str]:
            obj_chunk = "chat.completion.chunk" if kind == "chat" else "text_completion"
            finals: dict[int, dict] = {}
            started: set[int] = set()
            try:
                async for chunk in chunks:
                    i = chunk["index"]
                    meta = chunk["meta_info"]
                    choice: dict[str, Any] = {"index": i, "finish_reason": _finish(meta)}
                    if kind == "chat":
                        delta: dict[str, Any] = {"content": chunk["text"]}
                        if i not in started:
                            delta["role"] = "assistant"
                        choice["delta"] = delta
                        choice["logprobs"] = _chat_logprobs(engine, meta, len(chunk["output_ids"])) if logprobs is not None else None
                    else:
                        choice["text"] = chunk["text"]
                        choice["logprobs"] = (
                            _completion_logprobs(engine, meta, len(chunk["output_ids"])) if logprobs is not None else None
                        )
                    started.add(i)
                    if choice["finish_reason"] is not None:
                        finals[i] = chunk
                    yield sse({"id": rid, "object": obj_chunk, "created": created, "model": model, "choices": [choice]})
                if include_usage:
                    results = [finals[i] for i in sorted(finals)]
                    yield sse({"id": rid, "object": obj_chunk, "created": created, "model": model, "choices": [],
                               "usage": _usage(results, n)})  # fmt: skip
            except EngineDeadError as exc:
                yield sse({"error": {"message": str(exc), "code": 503}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions", openapi_extra=request_body("CompletionBody"))
    async def completions(request: Request):
        body = await read_json(request)
        try:
            params = op.sampling_from_openai(body, op.COMPLETION_KEYS)
            model = check_model(body)
            prompts = op.completion_prompts(body)
            logprobs = op.completion_logprobs(body)
            return await run(request, body, prompts, params, op.n_of(body), logprobs, "completion", model, body.get("stream", False))
        except RequestError as exc:
            raise op.openai_error(exc, "prompt", body) from None

    @app.post("/v1/chat/completions", openapi_extra=request_body("ChatBody"))
    async def chat_completions(request: Request):
        body = await read_json(request)
        try:
            params = op.sampling_from_openai(body, op.CHAT_KEYS)
            model = check_model(body)
            if body.get("messages") is None:
                raise RequestError("messages is required: a non-empty list of {role, content} objects", "messages")
            messages = op.chat_messages(body)
            schema = op.response_format_schema(body)
            if schema is not None:
                params["json_schema"] = schema
            kwargs = op.template_kwargs(body, getattr(engine.tokenizer, "chat_template", None))
            logprobs = op.chat_logprobs(body)
            try:  # off the event loop: a long conversation takes a while to render
                prompt = await engine.off_loop(engine.tokenizer.apply_chat_template, messages, tokenize=False,
                                               add_generation_prompt=True, **kwargs)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - the template rejected the conversation
                raise RequestError(f"messages could not be rendered by the model's chat template: {exc}", "messages") from exc
            return await run(request, body, [prompt], params, op.n_of(body), logprobs, "chat", model, body.get("stream", False))
        except RequestError as exc:
            raise op.openai_error(exc, "messages", body) from None


def _chat_logprobs(engine: AsyncEngine, meta: dict, last: int | None = None) -> dict[str, Any]:
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    if last is not None:
        entries, tops = entries[len(entries) - last :], tops[len(tops) - last :] if tops else []
    content = []
    for k, (lp, token, _text) in enumerate(entries):
        text = _token_text(engine, token)
        top = tops[k] if k < len(tops) and tops[k] else []
        content.append({
            "token": text, "logprob": lp, "bytes": list(text.encode()),
            "top_logprobs": [{"token": _token_text(engine, t), "logprob": l, "bytes": list(_token_text(engine, t).encode())}
                             for l, t, _ in top],
        })  # fmt: skip
    return {"content": content}


def _completion_logprobs(engine: AsyncEngine, meta: dict, last: int | None = None) -> dict[str, Any]:
    entries = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    if last is not None:
        entries, tops = entries[len(entries) - last :], tops[len(tops) - last :] if tops else []
    tokens = [_token_text(engine, t) for _, t, _ in entries]
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": [lp for lp, _, _ in entries],
        "top_logprobs": [{_token_text(engine, t): l for l, t, _ in (tops[k] or [])} if k < len(tops) else None
                         for k in range(len(entries))],  # fmt: skip
        "text_offset": offsets,
    }
