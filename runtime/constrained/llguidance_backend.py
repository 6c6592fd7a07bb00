"""Grammars on llguidance: regex, JSON Schema and GBNF / Lark, validated once, an `LLMatcher` per request.

    LLGuidanceCompiler(token bytes)  ->  CompiledLLGuidance (a checked prototype matcher)
                                     ->  LLGuidanceGrammar per request (a deep copy of it)

The tokenizer is built from Loom's own token id -> bytes map (no hub access). Ids without bytes
(special and added tokens, the padding up to the model's vocab_size) are llguidance special tokens
(a leading 0xFF byte, named `<[id]>` as in llguidance's Lark syntax) and never allowed by a grammar;
the engine's EOS ids are its EOS tokens, allowed exactly where the grammar may end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import llguidance as llg
import torch

from loom.runtime.constrained.errors import GrammarError


class _ByteTokenizer:
    """The slice of a tokenizer `llguidance.TokenizerWrapper` reads: the tokens' bytes and an
    encoder. llguidance encodes forced bytes to tokens with it; greedy longest match is enough
    (it only has to spell the bytes; bytes no token spells are skipped)."""

    def __init__(self, token_bytes: dict[int, bytes], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.eos_token_id = eos_token_ids[0] if eos_token_ids else None
        self.bos_token_id = None
        self.tokens = [token_bytes.get(i) or b"\xff<[%d]>" % i for i in range(vocab_size)]
        self.special_token_ids = [i for i in range(vocab_size) if not token_bytes.get(i)]
        self._ids = {b: i for i, b in token_bytes.items() if b and i < vocab_size}
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, data: bytes | str) -> list[int]:
        data = data.encode("utf-8") if isinstance(data, str) else data
        out: list[int] = []
        i = 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._ids.get(data[i : i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                i += 1
        return out


# Keywords whose value is one subschema, a list of them, or a map of names to them.
_ONE_SCHEMA = ("items", "additionalProperties", "additionalItems", "unevaluatedItems", "unevaluatedProperties", "not",
               "if", "then", "else", "contains", "propertyNames")  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def close_objects(schema: Any, *, in_all_of: bool = False) -> Any:
    """The schema with `additionalProperties: false` on every object schema that declares
    `properties` and says nothing of other keys: llguidance follows the spec there and admits any
    undeclared key, where Loom's other backends (and OpenAI's structured outputs) keep to the
    declared ones. The parts of an `allOf` stay open (each declares only some of the keys); their
    subschemas are closed."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if isinstance(out.get(key), (dict, list)):
            out[key] = close_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [close_objects(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [close_objects(s, in_all_of=True) for s in out["allOf"]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: close_objects(s) for name, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(out.get("properties"), dict) and not in_all_of and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


class LLGuidanceCompiler:
    """One LLTokenizer for the engine's vocabulary; `compile` is thread-safe (llguidance drops the GIL)."""

    def __init__(self, token_bytes: dict[int, bytes], vocab_size: int, eos_token_ids: frozenset[int], *,
                 whitespace_pattern: str = r"[ ]?", json_open_objects: bool = False) -> None:  # fmt: skip
        eos = sorted(t for t in eos_token_ids if t < vocab_size)
        self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_ByteTokenizer(token_bytes, vocab_size, eos)), n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos)
        # Whitespace bounded as on the other backends (an unbounded run lets a model wander).
        self.json_options = {"whitespace_pattern": whitespace_pattern}
        self.json_open_objects = json_open_objects

    def compile(self, kind: str, source: str) -> CompiledLLGuidance:
        """Raises GrammarError naming the grammar and llguidance's reason when it cannot be compiled."""
        shown = f" {source[:200]!r}" if kind != "json_schema" else ""
        try:
            if kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(source)
            elif kind == "json_schema":
                if not self.json_open_objects:
                    source = json.dumps(close_objects(json.loads(source)))
                grammar = llg.LLMatcher.grammar_from_json_schema(source, overrides=self.json_options)
            elif kind == "ebnf":
                grammar = llg.grammar_from("gbnf", source)  # GBNF, converted to llguidance's Lark
            elif kind == "lark":
                grammar = llg.LLMatcher.grammar_from_lark(source)
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}; expected regex, json_schema, ebnf or lark")
        except ValueError as e:  # json.JSONDecodeError included
            raise GrammarError(f"{kind}{shown} cannot be compiled by llguidance: {e}") from None
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise GrammarError(f"{kind}{shown} cannot be compiled by llguidance: {messages[0].strip()}")
        prototype = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if prototype.is_error():
            raise GrammarError(f"{kind}{shown} cannot be compiled by llguidance: {prototype.get_error().strip()}")
        return CompiledLLGuidance(prototype, self.vocab_size, self.eos_token_ids)


class CompiledLLGuidance:
    def __init__(self, prototype: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.prototype = prototype  # at the initial state, never advanced: matchers are copies of it
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def matcher(self) -> LLGuidanceGrammar:
        return LLGuidanceGrammar(self, self.prototype.deep_copy())


class LLGuidanceGrammar:
    """A Grammar (grammar.py) on llguidance's LLMatcher."""

    def __init__(self, compiled: CompiledLLGuidance, matcher: Any) -> None:
        self.compiled = compiled
        self.m = matcher
        self.n_accepted = 0  # tokens accepted (EOS included); bounds rollback
        self.finished = False  # EOS accepted

    def accept_token(self, token_id: int) -> bool:
        if self.finished or not 0 <= token_id < self.compiled.vocab_size:
            return False
        if token_id in self.compiled.eos_token_ids:  # try_consume_tokens never consumes EOS
            if not self.m.is_accepting() or not self.m.consume_token(token_id):
                return False
            self.finished = True
        # try_consume_tokens leaves the state as it was on a refused token (consume_token would
        # put the matcher in a permanent error state).
        elif self.m.try_consume_tokens([token_id]) != 1:
            return False
        self.n_accepted += 1
        return True

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        # bitmask_row: [ceil(V / 32)] int32, contiguous on the CPU (a row of the scheduler's bitmask)
        assert bitmask_row.is_contiguous() and bitmask_row.device.type == "cpu", "llguidance writes the mask in place"
        self.m.unsafe_compute_mask_ptr(bitmask_row.data_ptr(), bitmask_row.numel() * 4)
        assert not self.m.is_error(), f"llguidance matcher failed: {self.m.get_error()}"

    def allowed_ids(self, limit: int) -> torch.Tensor | None:
        return None  # llguidance writes masks in place, into the scheduler's row: there is none to list

    def is_terminated(self) -> bool:
        return self.finished or self.m.is_stopped()

    def forced_bytes(self) -> bytes:
        if self.is_terminated() or self.m.is_accepting():
            return b""
        return self.m.compute_ff_bytes()

    def rollback(self, k: int) -> None:
        if k < 0 or k > self.n_accepted:
            raise ValueError(f"cannot roll back {k} tokens: only {self.n_accepted} were accepted")
        if k:
            assert self.m.rollback(k), f"llguidance could not roll back {k} tokens: {self.m.get_error()}"
            self.n_accepted -= k
            self.finished = False

    def copy(self) -> LLGuidanceGrammar:
        other = LLGuidanceGrammar(self.compiled, self.m.deep_copy())
        other.n_accepted = self.n_accepted
        other.finished = self.finished
        return other
