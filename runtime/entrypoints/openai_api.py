"""OpenAI-compatible routes: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

Each request is mapped onto Loom's sampling params (SGLang's extras such as `top_k`, `min_p`,
`ignore_eos` come through `extra_body`) and run by `AsyncEngine`; `n > 1` runs n requests.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from loom.runtime.entrypoints.http_io import await_result, first_then_rest, read_json, sse
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import GenerateRequest, RequestError

_COMMON = {
    "model", "stream", "stream_options", "n", "stop", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "seed", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "user",
    # SGLang's extras (extra_body)
    "top_k", "min_p", "ignore_eos", "repetition_penalty", "min_tokens", "stop_token_ids", "skip_special_tokens",
    "no_stop_trim", "regex", "ebnf", "lark", "json_schema", "rid",
}  # fmt: skip
_COMPLETION_KEYS = _COMMON | {"prompt", "echo", "suffix", "best_of"}
_CHAT_KEYS = _COMMON | {"messages", "response_format", "tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs"}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def _check_type(body: dict, key: str, types: tuple, expected: str) -> None:
    value = body.get(key)
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        raise RequestError(f"{key} must be {expected}, got {value!r}", key)


def sampling_from_openai(body: dict, allowed: set[str]) -> dict[str, Any]:
    """OpenAI request fields -> Loom sampling params. RequestError names a bad or unknown field."""
    unknown = set(body) - allowed
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}", sorted(unknown)[0])
    _check_type(body, "max_tokens", (int,), "an int >= 0")
    _check_type(body, "max_completion_tokens", (int,), "an int >= 0")
    _check_type(body, "n", (int,), "an int >= 1")
    _check_type(body, "temperature", (int, float), "a number >= 0")
    _check_type(body, "top_p", (int, float), "a number in (0, 1]")
    _check_type(body, "seed", (int,), "an int")
    _check_type(body, "stop", (str, list), "a string or a list of strings")
    _check_type(body, "stream", (bool,), "a bool")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and max_tokens < 0:
        raise RequestError(f"max_tokens must be an int >= 0, got {max_tokens!r}", "max_tokens")
    params: dict[str, Any] = {"max_new_tokens": max_tokens}
    for key, name in (
        ("temperature", "temperature"), ("top_p", "top_p"), ("seed", "seed"), ("stop", "stop"),
        ("frequency_penalty", "frequency_penalty"), ("presence_penalty", "presence_penalty"), ("top_k", "top_k"),
        ("min_p", "min_p"), ("ignore_eos", "ignore_eos"), ("repetition_penalty", "repetition_penalty"),
        ("min_tokens", "min_new_tokens"), ("stop_token_ids", "stop_token_ids"),
        ("skip_special_tokens", "skip_special_tokens"), ("no_stop_trim", "no_stop_trim"), ("regex", "regex"),
        ("ebnf", "ebnf"), ("lark", "lark"), ("json_schema", "json_schema"),
    ):  # fmt: skip
        if body.get(key) is not None:
            params[name] = body[key]
    return params


def _n(body: dict) -> int:
    n = body.get("n") or 1
    if n < 1 or n > 128:
        raise RequestError(f"n must be an int in [1, 128], got {n!r}", "n")
    return n


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

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        params = sampling_from_openai(body, _COMPLETION_KEYS)
        model = check_model(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            prompts = prompt
        else:
            raise RequestError("prompt must be a string, a list of strings, or token ids (list of ints or lists)", "prompt")
        if body.get("echo"):
            raise RequestError("echo is not supported", "echo")
        logprobs = body.get("logprobs")
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
            raise RequestError(f"logprobs must be an int in [0, 20], got {logprobs!r}", "logprobs")
        return await run(request, body, prompts, params, _n(body), logprobs, "completion", model, body.get("stream", False))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        params = sampling_from_openai(body, _CHAT_KEYS)
        model = check_model(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list of {role, content} objects", "messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{i}] must be an object with a string `role`", f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                try:
                    m = {**m, "content": "".join(part["text"] for part in content if part.get("type") == "text")}
                except (TypeError, KeyError, AttributeError) as exc:
                    raise RequestError(f"messages[{i}].content parts must be {{type: text, text}}", f"messages[{i}].content") from exc
                messages[i] = m
            elif content is not None and not isinstance(content, str):
                raise RequestError(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        fmt = body.get("response_format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise RequestError("response_format.json_schema.schema must be an object", "response_format")
                params["json_schema"] = schema
            elif kind == "json_object":
                params["json_schema"] = {"type": "object"}
            elif kind != "text":
                raise RequestError("response_format.type must be text, json_object or json_schema", "response_format")
        if body.get("tools"):
            raise RequestError("tools are not supported", "tools")
        try:
            prompt = engine.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **(body.get("chat_template_kwargs") or {})
            )
        except Exception as exc:  # noqa: BLE001 - the template rejected the conversation
            raise RequestError(f"messages could not be rendered by the model's chat template: {exc}", "messages") from exc
        logprobs = None
        if body.get("logprobs"):
            top = body.get("top_logprobs") or 0
            if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
                raise RequestError(f"top_logprobs must be an int in [0, 20], got {top!r}", "top_logprobs")
            logprobs = top
        return await run(request, body, [prompt], params, _n(body), logprobs, "chat", model, body.get("stream", False))


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
