"""The soak's requests: native and OpenAI routes, streamed and not, constrained (JSON Schema, regex)
and not, some streams abandoned part-way. Everything varies with the seed: prompts, schemas (their
property names, types and bounds), regexes and sampling settings, so that caches keyed by what a
request carries (grammars, shapes) see many keys, as in real traffic.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

ROUTES = ("/generate", "/v1/completions", "/v1/chat/completions")
WORDS = (
    "alpha beta gamma delta river stone cloud market engine garden silver window bridge number letter planet "
    "story winter summer yellow purple orange quiet rapid gentle brave simple strange modern ancient city "
    "forest ocean mountain valley castle dragon robot teacher doctor farmer music paper coffee bread apple "
    "train rocket island desert harbor lantern mirror signal shadow thunder velvet whisper zebra"
).split()
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer briefly.",
    "You are a travel agent who answers in one sentence.",
    "You extract facts from text and reply in JSON.",
    "You are a poet. Reply with a short verse.",
)


@dataclass(frozen=True)
class SoakRequest:
    index: int
    route: str
    body: dict[str, Any]
    stream: bool
    constraint: str  # "none", "json_schema" or "regex"
    abandon_after: int | None  # streamed events read before the client walks away; None: read to the end

    @property
    def kind(self) -> str:
        route = {"/generate": "native", "/v1/completions": "completions", "/v1/chat/completions": "chat"}[self.route]
        return f"{route} {'stream' if self.stream else 'whole'} {self.constraint}"


def random_property(rng: random.Random, depth: int) -> dict[str, Any]:
    kind = rng.choice(["string", "integer", "boolean", "enum", "number", "array"] + (["object"] if depth == 0 else []))
    if kind == "string":
        prop: dict[str, Any] = {"type": "string", "maxLength": rng.randint(3, 16)}
        if rng.random() < 0.3:
            prop["minLength"] = 1
        return prop
    if kind == "integer":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(5, 5000)}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(2, 5))}
    if kind == "array":
        return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": rng.randint(9, 999)},
                "maxItems": rng.randint(1, 4)}  # fmt: skip
    if kind == "object":
        return random_schema(rng, depth + 1, max_props=2)
    return {"type": kind}


def random_schema(rng: random.Random, depth: int = 0, max_props: int = 4) -> dict[str, Any]:
    """A closed JSON-Schema object of 1..max_props properties of random names, types and bounds."""
    names = [f"{rng.choice(WORDS)}_{rng.randrange(1000)}" for _ in range(rng.randint(1, max_props))]
    names = list(dict.fromkeys(names))
    props = {name: random_property(rng, depth) for name in names}
    required = rng.sample(names, rng.randint(1, len(names)))
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def random_regex(rng: random.Random) -> str:
    pieces = [
        lambda: f"[a-z]{{{rng.randint(1, 3)},{rng.randint(4, 9)}}}",
        lambda: f"[A-Z][a-z]{{1,{rng.randint(3, 8)}}}",
        lambda: f"[0-9]{{{rng.randint(1, 2)},{rng.randint(3, 5)}}}",
        lambda: "(" + "|".join(rng.sample(WORDS, rng.randint(2, 4))) + ")",
        lambda: rng.choice(WORDS),
        lambda: f"[0-9a-f]{{{rng.randint(2, 8)}}}",
    ]
    sep = rng.choice(["-", " ", ", ", ":", "_"])
    return sep.join(rng.choice(pieces)() for _ in range(rng.randint(2, 4)))


def random_prompt(rng: random.Random, words: tuple[int, int]) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))
    if rng.random() < 0.3:  # a shared beginning, so that the prefix cache both hits and misses
        text = rng.choice(SYSTEM_PROMPTS) + " " + text
    return text


def make_requests(n: int, seed: int = 0, *, model: str = "default", abandon: float = 0.10, constrained: float = 0.3,
                  stream: float = 0.5, words: tuple[int, int] = (3, 24), max_tokens: tuple[int, int] = (2, 16),
                  constrained_max_tokens: tuple[int, int] = (16, 48)) -> list[SoakRequest]:  # fmt: skip
    """`n` requests drawn from `seed`: each route a third, `stream` of them streamed (of which
    `abandon` are left after a few events), `constrained` of them under a schema (2/3) or a regex."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        route = rng.choice(ROUTES)
        is_stream = rng.random() < stream
        constraint = "none"
        if rng.random() < constrained:
            constraint = "json_schema" if rng.random() < 2 / 3 else "regex"
        limit = rng.randint(*(constrained_max_tokens if constraint != "none" else max_tokens))
        temperature = rng.choice([0.0, 0.7, 1.0])
        grammar: Any = random_schema(rng) if constraint == "json_schema" else random_regex(rng) if constraint == "regex" else None
        prompt = random_prompt(rng, words)
        body = _body(route, model, prompt, rng, is_stream, limit, temperature, constraint, grammar)
        abandon_after = rng.randint(1, 3) if is_stream and rng.random() < abandon else None
        reqs.append(SoakRequest(i, route, body, is_stream, constraint, abandon_after))
    return reqs


def _body(route: str, model: str, prompt: str, rng: random.Random, stream: bool, limit: int, temperature: float,
          constraint: str, grammar: Any) -> dict[str, Any]:  # fmt: skip
    if route == "/generate":
        params: dict[str, Any] = {"max_new_tokens": limit, "temperature": temperature}
        if constraint == "json_schema":
            params["json_schema"] = json.dumps(grammar)
        elif constraint == "regex":
            params["regex"] = grammar
        return {"text": prompt, "sampling_params": params, "stream": stream}
    body: dict[str, Any] = {"model": model, "max_tokens": limit, "temperature": temperature, "stream": stream}
    if stream and rng.random() < 0.5:
        body["stream_options"] = {"include_usage": True}
    if route == "/v1/completions":
        body["prompt"] = prompt
        if constraint == "json_schema":
            body["json_schema"] = json.dumps(grammar)
        elif constraint == "regex":
            body["regex"] = grammar
        return body
    messages = [{"role": "user", "content": prompt}]
    if rng.random() < 0.5:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    if rng.random() < 0.2:
        messages[-1:-1] = [{"role": "user", "content": random_prompt(rng, (2, 8))},
                           {"role": "assistant", "content": random_prompt(rng, (2, 8))}]  # fmt: skip
    body["messages"] = messages
    if constraint == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": grammar}}
    elif constraint == "regex":
        body["regex"] = grammar
    return body
