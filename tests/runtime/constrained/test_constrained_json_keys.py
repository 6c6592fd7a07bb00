"""Property names that JSON must escape (a quote, a backslash, control characters), names holding
regex syntax, and non-ASCII names come out as valid JSON keys on every path: the regex path, the
grammar path, `const` / `enum` objects, jump-forward, and the xgrammar and llguidance backends.

outlines-core spells a closed object's keys and a const object's keys raw: `{"a\\"b": 1}` came
out as `{"a"b": 1}`, which is not JSON."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom.runtime.constrained import GrammarBackend, schema_to_regex
from loom.runtime.constrained.ebnf import CompiledEbnf
from loom.runtime.entrypoints.engine import LocalEngine

from byte_vocab import BYTES, EOS, V, walk  # a random walk under the mask, one byte per token

BACKENDS = ("outlines", "xgrammar", "llguidance")
ESCAPED = ['a"b', "back\\slash", "new\nline", "tab\there", "ctl\x01", "\\d", 'q"\\"', "ls\u2028ps"]
PLAIN = ["café", "名前", "emoji😀", "a.b", "a+b", "(x)", "[y]", "a|b", "^$", "a{2}"]
KEYS = ESCAPED + PLAIN


def shapes(key: str) -> dict[str, tuple[dict, dict]]:
    """A schema of each object shape holding `key`, with one instance of it."""
    return {
        "required": ({"type": "object", "properties": {key: {"type": "integer"}}, "required": [key]}, {key: 1}),
        "optional": ({"type": "object", "properties": {key: {"type": "integer"}, "z": {"type": "integer"}}}, {key: 1}),
        "open": ({"type": "object", "properties": {key: {"type": "integer"}}, "required": [key], "additionalProperties": True},
                 {key: 1, "other": 2}),  # fmt: skip
        "const": ({"type": "object", "properties": {"c": {"const": {key: [1, {key: None}]}}}, "required": ["c"]},
                  {"c": {key: [1, {key: None}]}}),  # fmt: skip
        "enum": ({"type": "object", "properties": {"c": {"enum": [{key: 1}, key]}}, "required": ["c"]}, {"c": {key: 1}}),
    }


@pytest.mark.parametrize("key", KEYS, ids=ascii)
def test_regex_path_spells_keys_as_json_writes_them(key):
    for shape, (schema, instance) in shapes(key).items():
        regex = schema_to_regex(json.dumps(schema))
        text = json.dumps(instance, ensure_ascii=False, separators=(",", ":"))
        assert re.fullmatch(regex, text), (shape, text)
        raw = text.replace(json.dumps(key, ensure_ascii=False), f'"{key}"')
        if raw != text:  # the key written without its escapes is not JSON, or another key
            assert not re.fullmatch(regex, raw), (shape, raw)


FLAT = {"type": "object", "properties": {k: {"type": "integer"} for k in KEYS}, "required": KEYS, "additionalProperties": False}
# A string longer than the regex path builds sends the schema down the grammar path.
LONG = {"type": "object", "properties": {**{k: {"type": "boolean"} for k in KEYS}, "s": {"type": "string", "maxLength": 3000}},
        "required": KEYS, "additionalProperties": False}  # fmt: skip
CONST = {"type": "object", "properties": {"c": {"const": {k: 1 for k in KEYS}}}, "required": ["c"]}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> GrammarBackend:
    backend = GrammarBackend(BYTES, V, frozenset({EOS}), grammar_backend=request.param)
    yield backend
    backend.shutdown()


@pytest.mark.parametrize("schema", [FLAT, LONG, CONST], ids=["flat", "grammar-path", "const"])
def test_walks_give_json_with_every_key(backend, schema):
    finished = 0
    for seed in range(8):
        text = walk(backend, schema, seed, max_steps=600)
        if text is None:
            continue
        value = json.loads(text.decode("utf-8"))
        jsonschema.validate(value, schema)
        assert set(value if schema is not CONST else value["c"]) >= set(KEYS)
        finished += 1
    assert finished >= 2, "too few walks ended to check"


def test_long_string_schema_takes_the_grammar_path():
    backend = GrammarBackend(BYTES, V, frozenset({EOS}))
    try:
        assert isinstance(backend.compile("json_schema", json.dumps(LONG)).result(timeout=120), CompiledEbnf)
    finally:
        backend.shutdown()


# ----------------------------------------------------------------------------- the engine

ENGINE_KEYS = ['a"b', "back\\slash", "new\nline", "ctl\x01", "café", "名前", "a+b"]
ENGINE_SCHEMAS = {
    "flat": {"type": "object", "properties": {k: {"type": "boolean"} for k in ENGINE_KEYS}, "required": ENGINE_KEYS,
             "additionalProperties": False},  # fmt: skip
    "recursive": {  # the grammar path
        "$defs": {"n": {"type": "object", "required": [*ENGINE_KEYS, "kid"],
                        "properties": {**{k: {"type": "boolean"} for k in ENGINE_KEYS}, "kid": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}}},  # fmt: skip
        "$ref": "#/$defs/n",
    },
}


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return str(make_tiny_model("qwen2", vocab_size=512, seed=11))


@pytest.mark.slow
@pytest.mark.parametrize("grammar_backend", BACKENDS)
@pytest.mark.parametrize("jump_forward", [True, False], ids=["jump-forward", "token-by-token"])
def test_engine_outputs_are_json_with_the_keys(model_path, grammar_backend, jump_forward):
    with LocalEngine(model_path=model_path, max_total_tokens=4096, grammar_backend=grammar_backend,
                     disable_jump_forward=not jump_forward) as engine:  # fmt: skip
        for name, schema in ENGINE_SCHEMAS.items():
            params = [{"json_schema": json.dumps(schema), "temperature": t, "seed": s, "max_new_tokens": 400}
                      for t, s in ((0, 0), (1.0, 1), (1.0, 2))]  # fmt: skip
            for p, out in zip(params, engine.generate(["JSON:"] * len(params), params)):
                if out["meta_info"]["finish_reason"]["type"] == "length" and name == "recursive" and p["temperature"]:
                    continue  # a sampled tree may nest past the budget; greedy ones and flat ones must end
                assert out["meta_info"]["finish_reason"]["type"] == "stop", (name, out["text"])
                value = json.loads(out["text"])
                jsonschema.validate(value, schema)
                assert set(value) == set(ENGINE_KEYS) | ({"kid"} if name == "recursive" else set())
