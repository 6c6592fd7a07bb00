"""One request sent, and its final answers counted.

A final answer is a finish_reason (native `meta_info.finish_reason`, OpenAI `choices[i].finish_reason`),
an error event in a stream, or a whole response that is not a 200. Every request must get exactly
one (per choice; these requests ask for one): none is a lost request, two a duplicated one. A
stream the client leaves on purpose (`abandon_after`) is abandoned, neither lost nor answered.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

SMALL_REQUEST = {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


@dataclass
class Outcome:
    kind: str
    status: int | None = None  # the HTTP status; None when no response came
    finals: int = 0  # final answers seen
    latency: float = 0.0  # seconds from sending to the last byte (or to the client leaving)
    ended: float = 0.0  # time.perf_counter() then
    abandoned: bool = False
    done: bool = False  # a stream's `data: [DONE]` came
    stream_error: bool = False  # a stream's final answer was an error event
    error: str = ""  # what went wrong on the client's side (transport, timeout, unparsable body)

    @property
    def lost(self) -> bool:
        return not self.abandoned and self.finals == 0

    @property
    def duplicated(self) -> bool:
        return not self.abandoned and self.finals > 1


def _finals_in(chunk: dict) -> int:
    """Final answers in one JSON body or stream event, native or OpenAI."""
    if "error" in chunk:
        return 1
    if isinstance(chunk.get("choices"), list):
        return sum(1 for c in chunk["choices"] if isinstance(c, dict) and c.get("finish_reason") is not None)
    meta = chunk.get("meta_info")
    return int(isinstance(meta, dict) and meta.get("finish_reason") is not None)


async def send(client: httpx.AsyncClient, route: str, body: dict, stream: bool, *, kind: str = "",
               abandon_after: int | None = None, timeout: float = 300.0) -> Outcome:  # fmt: skip
    out = Outcome(kind or route)
    t0 = time.perf_counter()
    try:
        if stream:
            await asyncio.wait_for(_read_stream(client, route, body, abandon_after, out), timeout)
        else:
            r = await asyncio.wait_for(client.post(route, json=body), timeout)
            out.status = r.status_code
            out.finals = _whole_finals(r)
    except asyncio.TimeoutError:
        out.error = f"no final answer within {timeout:.0f}s"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.ended = time.perf_counter()
    out.latency = out.ended - t0
    return out


def _whole_finals(r: httpx.Response) -> int:
    if r.status_code != 200:
        return 1  # an error answer is the request's final answer (its status is counted apart)
    try:
        body = r.json()
    except json.JSONDecodeError:
        return 0
    if isinstance(body, list):  # a native batch: one final per item
        return sum(_finals_in(item) for item in body if isinstance(item, dict))
    return _finals_in(body) if isinstance(body, dict) else 0


async def _read_stream(client: httpx.AsyncClient, route: str, body: dict, abandon_after: int | None, out: Outcome) -> None:
    events = 0
    async with client.stream("POST", route, json=body) as r:
        out.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            out.finals = 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                out.done = True
                break
            events += 1
            try:
                event = json.loads(data)
                out.finals += _finals_in(event)
                out.stream_error |= isinstance(event, dict) and "error" in event
            except json.JSONDecodeError:
                out.error = f"unparsable event {data[:80]!r}"
            if abandon_after is not None and events >= abandon_after and not out.finals:
                out.abandoned = True
                return  # leaving the block closes the connection: the server must abort the request


async def small_request(client: httpx.AsyncClient, timeout: float = 60.0) -> tuple[float, int | None]:
    """The latency of a tiny greedy /generate (4 tokens) -> (seconds, status or None)."""
    t0 = time.perf_counter()
    try:
        r = await client.post("/generate", json=SMALL_REQUEST, timeout=timeout)
        return time.perf_counter() - t0, r.status_code
    except httpx.HTTPError:
        return time.perf_counter() - t0, None
