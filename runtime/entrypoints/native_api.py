"""SGLang's native API, apart from its transport: the HTTP routes and the ZeroMQ front door both
answer through these functions, so a program sees the same fields and errors over either path."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import loom
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.protocol import RequestError


def cumulative_chunks(chunks: AsyncIterator[dict], numbered: bool) -> AsyncIterator[dict]:
    """The engine's stream chunks (deltas, the form Loom streams everywhere else) -> SGLang's
    /generate stream events: cumulative text and output ids per request, with `index` only where
    the answer is a list. SGLang's HTTP clients expect that form; it is made here, at the edge."""

    async def events() -> AsyncIterator[dict]:
        texts: dict[int, str] = {}
        ids: dict[int, list[int]] = {}
        async for chunk in chunks:
            i = chunk.pop("index")
            texts[i] = texts.get(i, "") + chunk["text"]
            ids.setdefault(i, []).extend(chunk["output_ids"])
            chunk["text"], chunk["output_ids"] = texts[i], list(ids[i])
            if numbered:
                chunk["index"] = i
            yield chunk

    return events()


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
        "version": loom.__version__,
        "pids": {"front": os.getpid(), **engine.child_pids},
        "ipc_dir": engine.ipc_dir,
    }


async def flush_cache(engine: AsyncEngine) -> None:
    """RequestError when the cache cannot be flushed now (requests are running)."""
    out = await engine.flush_cache()
    if not out.success:
        raise RequestError(f"cache not flushed: {out.message}")


__all__ = ["EngineDeadError", "cumulative_chunks", "flush_cache", "model_info", "parse_abort", "server_info"]
