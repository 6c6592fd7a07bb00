"""The bad-input corpus: malformed and hostile requests across every route, each with the status
issue 19 says it should get. None may answer 5xx, and none may stall the others: the campaign
times a small request beside each (`soak.py bad-input`).

Statuses: 400 malformed or out-of-range input (the JSON names the field), 401 a missing or wrong
API key, 404 an unknown model or route, 405 a method the route does not take, 413 a body past the
limit, 415 a body that is not `application/json`; a Host the server does not answer to gets 400
(421 and 403 also accepted), a cross-origin browser request 403. A few inputs are fine either way
(200 or 400: a lone surrogate in a string); those say so. Expectations come from the issue, not from
what the server does today: a case that fails says what is still to build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

GEN, COMP, CHAT = "/generate", "/v1/completions", "/v1/chat/completions"
BODY_ROUTES = (GEN, COMP, CHAT)
TAGS = {GEN: "generate", COMP: "completions", CHAT: "chat"}
HUGE_BODY_BYTES = 40 << 20  # past any sane request-body limit (the issue saw 30-50 MB bodies freeze the loop)
LONG_PROMPT_CHARS = 15 << 20  # under the default 16 MiB body limit, far past any context (tokenizing it took ~30 s)
DEEP = 100_000  # nesting levels


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    path: str
    body: bytes | None
    expect: tuple[int, ...]
    why: str
    headers: dict[str, str] = field(default_factory=dict)
    with_key: bool = True  # send the campaign's API key (cases about the key set it themselves)


def _raw(obj: Any) -> bytes:
    return obj if isinstance(obj, bytes) else json.dumps(obj).encode()


def post(name: str, path: str, body: Any, expect: tuple[int, ...] | int, why: str, **kw: Any) -> Case:
    expect = (expect,) if isinstance(expect, int) else expect
    headers = {"Content-Type": "application/json", **kw.pop("headers", {})}
    return Case(name, "POST", path, _raw(body), expect, why, headers, **kw)


def build_cases(model: str, context_len: int, api_key: str) -> list[Case]:
    """The corpus for a server serving `model` (its OpenAI name) with a context of `context_len`
    tokens and the API key `api_key`."""
    cases: list[Case] = []
    cases += _envelope_cases(model)
    cases += _native_cases(context_len)
    cases += _openai_cases(model, context_len)
    cases += _grammar_cases(model)
    cases += _http_cases(api_key)
    return cases


def _base(path: str, model: str) -> dict[str, Any]:
    if path == GEN:
        return {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    if path == COMP:
        return {"model": model, "prompt": "Hello", "max_tokens": 2}
    return {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}


def _with_nan(path: str, model: str) -> bytes:
    body = _base(path, model)
    where = body["sampling_params"] if path == GEN else body
    where["temperature"] = "__NAN__"
    return json.dumps(body).replace('"__NAN__"', "NaN").encode()


def _surrogate(path: str, model: str) -> bytes:
    """The route's small body with its text replaced by a lone UTF-16 surrogate escape (valid JSON,
    not a valid Unicode string)."""
    body = json.dumps(_base(path, model))
    return body.replace('"Hello"', '"\\ud800"').encode()


def _long_prompt(path: str, model: str) -> bytes:
    """The route's small body with its text replaced by LONG_PROMPT_CHARS of words."""
    return json.dumps(_base(path, model)).replace('"Hello"', '"' + "word " * (LONG_PROMPT_CHARS // 5) + '"').encode()


def _envelope_cases(model: str) -> list[Case]:
    """What every JSON route must refuse before looking inside: broken JSON, other shapes, size, depth."""
    out = []
    for path in BODY_ROUTES:
        tag = TAGS[path]
        out += [
            post(f"{tag}: truncated JSON", path, b'{"text": "Hel', 400, "malformed JSON"),
            post(f"{tag}: not JSON", path, b"hello there", 400, "malformed JSON"),
            post(f"{tag}: empty body", path, b"", 400, "malformed JSON"),
            post(f"{tag}: JSON array body", path, [1, 2, 3], 400, "the body must be an object"),
            post(f"{tag}: JSON string body", path, "just a string", 400, "the body must be an object"),
            post(f"{tag}: JSON null body", path, None, 400, "the body must be an object"),
            post(f"{tag}: trailing garbage", path, b'{"text": "x"} trailing', 400, "malformed JSON"),
            post(f"{tag}: invalid UTF-8", path, b'{"text": "\xff\xfe"}', 400, "malformed JSON (not UTF-8)"),
            post(f"{tag}: NaN literal", path, _with_nan(path, model), 400, "NaN is not JSON"),
            post(f"{tag}: nested {DEEP} deep (arrays)", path, b"[" * DEEP + b"]" * DEEP, 400, "nesting depth limit"),
            post(f"{tag}: nested {DEEP} deep in a field", path, b'{"text": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
                 400, "nesting depth limit"),
            post(f"{tag}: {HUGE_BODY_BYTES >> 20} MB body", path, b'{"text": "' + b"a" * HUGE_BODY_BYTES + b'"}', 413,
                 "request-body limit, 413 naming it"),
            post(f"{tag}: {LONG_PROMPT_CHARS >> 20} MB prompt within the body limit", path, _long_prompt(path, model), 400,
                 "past the context: refused before tokenizing"),
        ]
    return out


def _native_cases(context_len: int) -> list[Case]:
    def gen(name: str, body: dict, expect: tuple[int, ...] | int, why: str) -> Case:
        return post(f"generate: {name}", GEN, body, expect, why)

    sp = {"max_new_tokens": 2}
    return [
        gen("text is a number", {"text": 5}, 400, "wrong type"),
        gen("text is a list of numbers", {"text": [1, 2]}, 400, "wrong type"),
        gen("text and input_ids both", {"text": "a", "input_ids": [1, 2]}, 400, "one prompt form"),
        gen("no prompt", {"sampling_params": sp}, 400, "text or input_ids required"),
        gen("batch of 100,000 prompts", {"text": ["a"] * 100_000, "sampling_params": sp}, 400, "work per call bounded"),
        gen("33 prompts x n 128", {"text": ["a"] * 33, "sampling_params": {"max_new_tokens": 2, "n": 128}}, 400,
            "work per call bounded"),
        gen("empty input_ids", {"input_ids": []}, 400, "an empty prompt"),
        gen("input_ids of strings", {"input_ids": ["a", "b"]}, 400, "wrong type"),
        gen("input_ids out of the vocabulary", {"input_ids": [10**9]}, 400, "token id range"),
        gen("negative input_ids", {"input_ids": [-5]}, 400, "token id range"),
        gen("sampling_params is a string", {"text": "a", "sampling_params": "fast"}, 400, "wrong type"),
        gen("unknown sampling param", {"text": "a", "sampling_params": {"warp_speed": 9}}, 400, "unknown field"),
        gen("max_new_tokens is a string", {"text": "a", "sampling_params": {"max_new_tokens": "10"}}, 400, "wrong type"),
        gen("max_new_tokens negative", {"text": "a", "sampling_params": {"max_new_tokens": -1}}, 400, "range"),
        gen("max_new_tokens 10^12", {"text": "a", "sampling_params": {"max_new_tokens": 10**12}}, 400,
            "past the context: 400 with the context length"),
        gen(f"max_new_tokens past the context ({context_len * 40})", {"text": "a", "sampling_params": {"max_new_tokens": context_len * 40}},
            400, "past the context"),
        gen("max_new_tokens 2^70", {"text": "a", "sampling_params": {"max_new_tokens": 2**70}}, 400, "integer overflow"),
        gen("temperature is a string", {"text": "a", "sampling_params": {"temperature": "hot"}}, 400, "wrong type"),
        gen("temperature negative", {"text": "a", "sampling_params": {"temperature": -1}}, 400, "range"),
        gen("temperature 1e400 (inf)", b'{"text": "a", "sampling_params": {"temperature": 1e400}}', 400, "not finite"),
        gen("top_p 0", {"text": "a", "sampling_params": {"top_p": 0}}, 400, "range (0, 1]"),
        gen("top_p 1.5", {"text": "a", "sampling_params": {"top_p": 1.5}}, 400, "range (0, 1]"),
        gen("min_p 2", {"text": "a", "sampling_params": {"min_p": 2}}, 400, "range [0, 1]"),
        gen("stop is a number", {"text": "a", "sampling_params": {"stop": 5}}, 400, "wrong type"),
        gen("stop list of numbers", {"text": "a", "sampling_params": {"stop": [1, 2]}}, 400, "wrong type"),
        gen("stop_token_ids strings", {"text": "a", "sampling_params": {"stop_token_ids": ["x"]}}, 400, "wrong type"),
        gen("seed 2^80", {"text": "a", "sampling_params": {"seed": 2**80}}, 400, "integer overflow"),
        gen("stream is a string", {"text": "a", "stream": "yes"}, 400, "wrong type"),
        gen("return_logprob is a string", {"text": "a", "return_logprob": "yes"}, 400, "wrong type"),
        gen("top_logprobs_num negative", {"text": "a", "return_logprob": True, "top_logprobs_num": -1}, 400, "range"),
        gen("logprob_start_len a string", {"text": "a", "return_logprob": True, "logprob_start_len": "x"}, 400, "wrong type"),
        gen("rid is a number", {"text": "a", "rid": 5}, 400, "wrong type"),
        gen("prompt past the context", {"input_ids": [100] * (context_len + 10), "sampling_params": sp}, 400,
            "prompt longer than the context"),
        gen("lone surrogate in text", b'{"text": "\\ud800", "sampling_params": {"max_new_tokens": 2}}', 400,
            "not Unicode: 400 naming the field"),
        post("abort_request: body is a list", "/abort_request", [1], 400, "the body must be an object"),
        post("abort_request: rid is a number", "/abort_request", {"rid": 5}, 400, "wrong type"),
        post("abort_request: no rid", "/abort_request", {}, 400, "rid required"),
    ]


def _openai_cases(model: str, context_len: int) -> list[Case]:
    out = []
    for path in (COMP, CHAT):
        tag = "completions" if path == COMP else "chat"

        def oai(name: str, change: dict, expect: tuple[int, ...] | int, why: str, drop: tuple[str, ...] = (),
                path: str = path, tag: str = tag) -> Case:  # fmt: skip
            body = {k: v for k, v in _base(path, model).items() if k not in drop} | change
            return post(f"{tag}: {name}", path, body, expect, why)

        out += [
            oai("n: 0", {"n": 0}, 400, "n out of range"),
            oai("n: -1", {"n": -1}, 400, "n out of range"),
            oai("n: 10^6", {"n": 10**6}, 400, "n out of range"),
            oai("n is a string", {"n": "2"}, 400, "wrong type"),
            oai("max_tokens 10^12", {"max_tokens": 10**12}, 400, "past the context: vLLM's 400 with the context length"),
            oai(f"max_tokens {context_len * 36 + 11}", {"max_tokens": context_len * 36 + 11}, 400, "past the context"),
            oai("max_tokens negative", {"max_tokens": -1}, 400, "range"),
            oai("max_tokens is a string", {"max_tokens": "5"}, 400, "wrong type"),
            oai("temperature is a string", {"temperature": "hot"}, 400, "wrong type, named as the client spelled it"),
            oai("top_p 7", {"top_p": 7}, 400, "range"),
            oai("unknown model", {"model": "no-such-model"}, 404, "unknown model"),
            oai("model is a number", {"model": 5}, (400, 404), "wrong type"),
            oai("unknown field", {"frobnicate": True}, 400, "unknown field"),
            oai("stream is a string", {"stream": "yes"}, 400, "wrong type"),
            oai("stream_options is a string", {"stream": True, "stream_options": "yes"}, 400,
                "stream_options must be an object (was a 500)"),
            oai("stream_options without stream", {"stream_options": {"include_usage": True}}, (200, 400), "either"),
            oai("logprobs is a string", {"logprobs": "yes"}, 400, "wrong type"),
            oai("stop list of numbers", {"stop": [1, 2]}, 400, "wrong type"),
            oai("seed is a float", {"seed": 1.5}, 400, "wrong type"),
            oai("user is a number", {"user": 5}, 400, "wrong type"),
        ]
    out += [
        post("completions: best_of 2", COMP, _base(COMP, model) | {"best_of": 2}, 400, "unsupported: rejected, not ignored"),
        post("completions: suffix", COMP, _base(COMP, model) | {"suffix": "end"}, 400, "unsupported: rejected, not ignored"),
        post("completions: top_logprobs without logprobs", COMP, _base(COMP, model) | {"top_logprobs": 3}, 400,
             "needs logprobs"),
        post("completions: prompt is a dict", COMP, _base(COMP, model) | {"prompt": {"a": 1}}, 400, "wrong type"),
        post("completions: prompt ids out of the vocabulary", COMP, _base(COMP, model) | {"prompt": [10**9]}, 400, "token id range"),
        post("completions: lone surrogate in prompt", COMP, _surrogate(COMP, model), 400, "not Unicode: 400 naming the field"),
        post("chat: lone surrogate in content", CHAT, _surrogate(CHAT, model), 400, "not Unicode: 400 naming the field"),
        post("completions: empty prompt list", COMP, _base(COMP, model) | {"prompt": []}, 400, "an empty prompt"),
        post("completions: prompt past the context", COMP, _base(COMP, model) | {"prompt": [100] * (context_len + 10)}, 400,
             "prompt longer than the context"),
        post("chat: top_logprobs without logprobs", CHAT, _base(CHAT, model) | {"top_logprobs": 3}, 400, "needs logprobs"),
    ]

    def chat(name: str, messages: Any, expect: tuple[int, ...] | int, why: str, **extra: Any) -> Case:
        return post(f"chat: {name}", CHAT, _base(CHAT, model) | {"messages": messages} | extra, expect, why)

    out += [
        chat("unknown role", [{"role": "wizard", "content": "hi"}], 400, "unknown roles refused"),
        chat("role is a number", [{"role": 5, "content": "hi"}], 400, "wrong type"),
        chat("no role", [{"content": "hi"}], 400, "role required"),
        chat("content is a number", [{"role": "user", "content": 5}], 400, "wrong type"),
        chat("message is a string", ["hello"], 400, "wrong type"),
        chat("messages is a string", "hello", 400, "wrong type"),
        chat("empty messages", [], 400, "at least one message"),
        chat("unknown message key", [{"role": "user", "content": "hi", "mood": "sad"}], 400, "unknown field"),
        chat("content part of an unknown type", [{"role": "user", "content": [{"type": "video", "url": "x"}]}], 400,
             "unsupported content part"),
        chat("client chat template", [{"role": "user", "content": "hi"}], 400,
             "no client-supplied templates (code the server would run)",
             chat_template_kwargs={"chat_template": "{% for i in range(10**9) %}x{% endfor %}"}),
        chat("unknown chat_template_kwargs key", [{"role": "user", "content": "hi"}], 400, "only known keys",
             chat_template_kwargs={"frobnicate": 1}),
        chat("chat_template_kwargs is a list", [{"role": "user", "content": "hi"}], 400, "wrong type",
             chat_template_kwargs=[1]),
        chat("response_format is a string", [{"role": "user", "content": "hi"}], 400, "wrong type", response_format="json"),
        chat("response_format of an unknown type", [{"role": "user", "content": "hi"}], 400, "unknown type",
             response_format={"type": "yaml"}),
        chat("response_format.json_schema is a string", [{"role": "user", "content": "hi"}], 400,
             "must be an object (was a 500)", response_format={"type": "json_schema", "json_schema": "schema"}),
        chat("response_format.json_schema without schema", [{"role": "user", "content": "hi"}], 400, "schema required",
             response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        chat("tools is a string", [{"role": "user", "content": "hi"}], 400, "wrong type", tools="all"),
    ]
    return out


def _grammar_cases(model: str) -> list[Case]:
    """Constraints that are invalid, or valid but too large to compile in reasonable time."""
    huge_string = {"type": "string", "minLength": 200_000, "maxLength": 400_000}
    many_items = {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 50}}},
                  "minItems": 100_000}  # fmt: skip
    deep_schema: dict[str, Any] = {"type": "integer"}
    for _ in range(18):  # 54 JSON levels: inside the body's depth limit (64), so the grammar's own limits answer
        deep_schema = {"type": "object", "properties": {"a": deep_schema, "b": {"type": "string", "maxLength": 30}},
                       "required": ["a"]}  # fmt: skip
    out = []
    for path in BODY_ROUTES:
        tag = TAGS[path]

        def constrained(name: str, key: str, value: Any, why: str, path: str = path, tag: str = tag,
                        expect: tuple[int, ...] = (400,)) -> Case:  # fmt: skip
            body = _base(path, model)
            if path == GEN:
                body["sampling_params"] = body["sampling_params"] | {key: value}
            elif path == CHAT and key == "json_schema" and isinstance(value, dict):
                body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": value}}
            else:
                body[key] = value
            return post(f"{tag}: {name}", path, body, expect, why)

        out += [
            constrained("regex that does not parse", "regex", "(unclosed", "invalid regex"),
            constrained("regex a{100000}", "regex", "a{100000}", "repetition count past the limit"),
            constrained("regex [a-z]{1,1000000}", "regex", "[a-z]{1,1000000}", "repetition count past the limit"),
            constrained("schema that is not JSON", "json_schema", "{not json", "invalid schema"),
            constrained("schema of an unknown type", "json_schema", {"type": "frobnicate"}, "invalid schema"),
            constrained("schema with huge string bounds", "json_schema", huge_string,
                        "string bounds past the limit, refused up front (was 30-36 s and a stall)"),
            constrained("schema of 100,000 required items", "json_schema", many_items, "automaton size past the limit"),
            constrained("schema nested 18 objects deep", "json_schema", deep_schema, "automaton size: refused or compiled, never a stall",
                        expect=(200, 400)),
            constrained("ebnf that does not parse", "ebnf", "root ::= (", "invalid grammar"),
        ]
        if path == CHAT:  # its schema comes in response_format, so no "both" case here
            out.append(constrained("regex is a number", "regex", 5, "wrong type"))
        else:
            out.append(post(f"{tag}: regex and json_schema both", path, _with_two_constraints(path, model), 400,
                            "one constraint at most"))
    return out


def _with_two_constraints(path: str, model: str) -> bytes:
    body = _base(path, model)
    both = {"regex": "[a-z]+", "json_schema": json.dumps({"type": "string"})}
    if path == GEN:
        body["sampling_params"] = body["sampling_params"] | both
    else:
        body |= both
    return _raw(body)


def _http_cases(api_key: str) -> list[Case]:
    """Methods, routes, headers and the API key."""
    ok_body = {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}
    return [
        Case("GET /generate", "GET", GEN, None, (405,), "POST only"),
        Case("DELETE /generate", "DELETE", GEN, None, (405,), "POST only"),
        Case("GET /flush_cache", "GET", "/flush_cache", None, (405,), "state-changing routes only on POST"),
        Case("GET /v1/chat/completions", "GET", CHAT, None, (405,), "POST only"),
        Case("GET unknown route", "GET", "/no/such/route", None, (404,), "unknown route"),
        Case("HEAD /health", "HEAD", "/health", None, (200,), "HEAD where GET works"),
        Case("HEAD /v1/models", "HEAD", "/v1/models", None, (200,), "HEAD where GET works"),
        post("generate: text/plain body", GEN, ok_body, 415, "JSON routes require application/json",
             headers={"Content-Type": "text/plain"}),
        post("generate: form-encoded body", GEN, ok_body, 415, "JSON routes require application/json (a browser's simple request)",
             headers={"Content-Type": "application/x-www-form-urlencoded"}),
        post("chat: no Content-Type", CHAT, {"messages": []}, 415, "JSON routes require application/json",
             headers={"Content-Type": ""}),
        post("generate: Host evil.example", GEN, ok_body, (400, 403, 421), "DNS rebinding: loopback hosts only",
             headers={"Host": "evil.example"}),
        post("generate: cross-site Origin", GEN, ok_body, 403, "cross-origin browser requests refused",
             headers={"Origin": "http://evil.example"}),
        post("generate: no API key", GEN, ok_body, 401, "key required", with_key=False),
        post("generate: wrong API key", GEN, ok_body, 401, "key required", with_key=False,
             headers={"Authorization": "Bearer wrong"}),
        post("generate: API key without Bearer", GEN, ok_body, 401, "Bearer scheme", with_key=False,
             headers={"Authorization": api_key}),
        post("generate: lower-case bearer", GEN, ok_body, 200, "Bearer accepted case-insensitively", with_key=False,
             headers={"Authorization": f"bearer {api_key}"}),
        Case("GET /health without a key", "GET", "/health", None, (200,), "/health needs no key", with_key=False),
        post("generate: 64 KB header", GEN, ok_body, (200, 400, 431), "taken or refused, never 5xx",
             headers={"X-Padding": "a" * (64 << 10)}),
    ]
