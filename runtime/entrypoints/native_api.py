"""SGLang's native API, apart from its transport: the HTTP routes and the ZeroMQ front door both
answer through these functions, so a program sees the same fields and errors over either path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import RequestError

GENERATE_KEYS = {
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "top_logprobs_num",
    "return_text_in_logprobs", "stream", "rid", "reject_invalid",
}  # fmt: skip
# Keys SGLang clients may send that mean nothing for a text-only engine: accepted and ignored.
GENERATE_IGNORED = {"image_data", "lora_path", "custom_logit_processor", "bootstrap_host", "modalities", "log_metrics"}


def parse_generate(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A /generate body -> (keyword arguments of AsyncEngine.generate, stream). RequestError names
    the field that is wrong; the values themselves are checked by the tokenizer manager."""
    unknown = set(body) - GENERATE_KEYS - GENERATE_IGNORED
    if unknown:
        raise RequestError(f"unknown field(s) {sorted(unknown)}; expected some of {sorted(GENERATE_KEYS)}", sorted(unknown)[0])
    for flag in ("stream", "reject_invalid"):
        if not isinstance(body.get(flag, False), bool):
            raise RequestError(f"{flag} must be a bool, got {body[flag]!r}", flag)
    stream = body.get("stream", False)
    kwargs = dict(
        prompt=body.get("text"),
        input_ids=body.get("input_ids"),
        sampling_params=body.get("sampling_params"),
        return_logprob=body.get("return_logprob", False),
        logprob_start_len=body.get("logprob_start_len"),
        top_logprobs_num=body.get("top_logprobs_num", 0),
        return_text_in_logprobs=body.get("return_text_in_logprobs", False),
        rid=body.get("rid"),
        # Loom's own: False keeps an invalid grammar's abort as that request's result (loom.Engine)
        # instead of failing the whole call with a 400.
        reject_invalid=body.get("reject_invalid", True),
    )
    if kwargs["prompt"] is not None and kwargs["input_ids"] is not None:
        raise RequestError("give exactly one of `text` or `input_ids`", "text")
    if kwargs["prompt"] is None and kwargs["input_ids"] is None:
        raise RequestError("give one of `text` (a string or list of strings) or `input_ids`", "text")
    return fan_out_n(kwargs), stream


MAX_N = 128


def fan_out_n(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`sampling_params.n` > 1 (parallel sampling, as SGLang's /generate takes it): each prompt is
    repeated n times with n=1, so the copies share the cached prompt and sample independently;
    the answer is then a list, the n samples of each prompt next to each other."""
    params = kwargs["sampling_params"]
    items = kwargs["prompt"] if kwargs["prompt"] is not None else kwargs["input_ids"]
    batch = is_batch(kwargs)
    items = items if batch else [items]
    per_item = params if isinstance(params, list) else [params] * len(items)
    if len(per_item) != len(items) or not all(p is None or isinstance(p, dict) for p in per_item):
        return kwargs  # the tokenizer manager names what is wrong with sampling_params
    ns = [1 if p is None else p.get("n", 1) for p in per_item]
    for n in ns:
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
            raise RequestError(f"sampling_params.n must be an int in [1, {MAX_N}], got {n!r}", "sampling_params.n")
    if all(n == 1 for n in ns):
        return kwargs
    if kwargs["rid"] is not None:
        raise RequestError("rid cannot be given with sampling_params.n > 1 (each sample is its own request)", "rid")
    index = [i for i, n in enumerate(ns) for _ in range(n)]
    out = dict(kwargs)
    out["prompt" if kwargs["prompt"] is not None else "input_ids"] = [items[i] for i in index]
    out["sampling_params"] = [{**(per_item[i] or {}), "n": 1} for i in index]
    for key in ("return_logprob", "logprob_start_len", "top_logprobs_num"):
        if isinstance(kwargs[key], list) and len(kwargs[key]) == len(items):
            out[key] = [kwargs[key][i] for i in index]
    return out


def is_batch(kwargs: dict[str, Any]) -> bool:
    ids = kwargs["input_ids"]
    return isinstance(kwargs["prompt"], list) or bool(ids and isinstance(ids[0], list))


async def cumulative_chunks(chunks: AsyncIterator[dict], batch: bool) -> AsyncIterator[dict]:
    """Engine stream chunks (deltas) -> SGLang's stream events: cumulative text and output ids per
    request, with `index` only for a batch."""
    texts: dict[int, str] = {}
    ids: dict[int, list[int]] = {}
    async for chunk in chunks:
        i = chunk.pop("index")
        texts[i] = texts.get(i, "") + chunk["text"]
        ids.setdefault(i, []).extend(chunk["output_ids"])
        chunk["text"], chunk["output_ids"] = texts[i], list(ids[i])
        if batch:
            chunk["index"] = i
        yield chunk


def parse_abort(body: dict[str, Any]) -> str:
    rid = body.get("rid")
    if not isinstance(rid, str) or not rid:
        raise RequestError("rid must be a non-empty string", "rid")
    return rid


def model_info(engine: AsyncEngine, served_model_name: str) -> dict[str, Any]:
    return {
        "model_path": engine.server_args.model_path,
        "tokenizer_path": engine.server_args.tokenizer_path or engine.server_args.model_path,
        "is_generation": True,
        "served_model_name": served_model_name,
        "context_length": engine.ready.context_len if engine.ready else None,
        "vocab_size": engine.ready.vocab_size if engine.ready else None,
        # What a front end needs to render chat roles itself (the language's chat roles).
        "chat_template": getattr(engine.tokenizer, "chat_template", None),
        "bos_token": getattr(engine.tokenizer, "bos_token", None),
        "eos_token": getattr(engine.tokenizer, "eos_token", None),
    }


async def server_info(engine: AsyncEngine) -> dict[str, Any]:
    info = await engine.scheduler_info()
    replicas = getattr(engine, "replica_infos", None)  # data parallel: each replica's own figures too
    extra = {"replicas": [{"memory": i.memory, "stats": i.stats} for i in await replicas()]} if replicas else {}
    return {
        **extra,
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


async def flush_cache(engine: AsyncEngine) -> None:
    """RequestError when the cache cannot be flushed now (requests are running)."""
    out = await engine.flush_cache()
    if not out.success:
        raise RequestError(f"cache not flushed: {out.message}")


__all__ = [
    "GENERATE_IGNORED", "GENERATE_KEYS", "EngineDeadError", "cumulative_chunks", "flush_cache", "is_batch", "model_info",
    "parse_abort", "parse_generate", "server_info",
]  # fmt: skip
