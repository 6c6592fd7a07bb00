"""Grammars on xgrammar: regex, JSON Schema, GBNF and Lark compiled once, a `GrammarMatcher` per request.

    XGrammarCompiler(token bytes)  ->  CompiledXGrammar  ->  XGrammarGrammar per request

The vocabulary is built from Loom's own token id -> bytes map (no hub access): ids without bytes
(special and added tokens, the padding between the tokenizer's length and the model's
vocab_size) are empty, which xgrammar treats as special and never allows. The engine's EOS ids
are xgrammar's stop tokens, so EOS is allowed exactly where the grammar may end.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import xgrammar as xgr

from loom.runtime.constrained.bitmask import pack_allowed
from loom.runtime.constrained.errors import GrammarError

# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; the user needs the rest.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _message(exc: BaseException) -> str:
    return _LOCATION.sub("", str(exc).strip()).strip()


class XGrammarCompiler:
    """One TokenizerInfo and GrammarCompiler for the engine's vocabulary; `compile` is thread-safe."""

    def __init__(self, token_bytes: dict[int, bytes], vocab_size: int, eos_token_ids: frozenset[int], *, json_open_objects: bool = False) -> None:
        encoded = [token_bytes.get(i, b"") for i in range(vocab_size)]  # ids >= vocab_size cannot be sampled
        stop = sorted(t for t in eos_token_ids if t < vocab_size)
        self.info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=stop)
        # Loom's own cache (GrammarBackend) sits in front; one thread per compilation, as the pool runs several.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(stop)
        self.json_open_objects = json_open_objects
        # xgrammar 0.2.8 lets raw control characters into JSON strings with a length bound (invalid
        # JSON). With fixed separators no JSON text needs a byte < 0x20, so such tokens are masked out.
        self.json_illegal = frozenset(i for i, b in enumerate(encoded) if any(c < 0x20 for c in b))

    def compile(self, kind: str, source: str) -> CompiledXGrammar:
        """Raises GrammarError naming the grammar and xgrammar's reason when it cannot be compiled."""
        try:
            if kind == "regex":
                compiled = self.compiler.compile_regex(source)
            elif kind == "json_schema":
                # Whitespace bounded (an unbounded run lets a model wander): xgrammar's fixed separators.
                # strict_mode closes objects without additionalProperties, as Loom's other backends do.
                compiled = self.compiler.compile_json_schema(source, any_whitespace=False, strict_mode=not self.json_open_objects)
            elif kind == "ebnf":  # GBNF (root ::= ...)
                compiled = self.compiler.compile_grammar(source)
            elif kind == "lark":
                compiled = self.compiler.compile_lark(source)
            else:
                raise GrammarError(f"unknown grammar kind {kind!r}; expected regex, json_schema, ebnf or lark")
        except (RuntimeError, ValueError, TypeError) as e:
            shown = f" {source[:200]!r}" if kind != "json_schema" else ""
            raise GrammarError(f"{kind}{shown} cannot be compiled by xgrammar: {_message(e)}") from None
        return CompiledXGrammar(compiled, self.vocab_size, self.eos_token_ids, self.json_illegal if kind == "json_schema" else frozenset())


class CompiledXGrammar:
    def __init__(self, compiled: Any, vocab_size: int, eos_token_ids: frozenset[int], illegal: frozenset[int]) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.illegal = illegal  # tokens refused whatever xgrammar says (see XGrammarCompiler)
        # Packed rows [ceil(V / 32)] int32: every bit but EOS's (mask & it != 0 <=> a non-EOS token
        # is allowed), and every bit but the illegal tokens'.
        self.non_eos = ~pack_allowed(sorted(eos_token_ids), vocab_size)
        self.legal = ~pack_allowed(sorted(illegal), vocab_size) if illegal else None

    def matcher(self) -> XGrammarGrammar:
        return XGrammarGrammar(self, xgr.GrammarMatcher(self.compiled))


class XGrammarGrammar:
    """A Grammar (grammar.py) on xgrammar's GrammarMatcher. The mask of the current state is
    cached: `is_terminated` needs it at the grammar's final states, and the next `fill_mask`
    reuses it."""

    def __init__(self, compiled: CompiledXGrammar, matcher: Any) -> None:
        self.compiled = compiled
        self.m = matcher
        self.n_accepted = 0  # tokens accepted (EOS included); bounds rollback
        self._mask: torch.Tensor | None = None  # [ceil(V / 32)] int32, for the current state

    def accept_token(self, token_id: int) -> bool:
        if not 0 <= token_id < self.compiled.vocab_size or token_id in self.compiled.illegal or not self.m.accept_token(token_id):
            return False
        self.n_accepted += 1
        self._mask = None
        return True

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        # bitmask_row: [ceil(V / 32)] int32
        bitmask_row.copy_(self._current_mask())

    def allowed_ids(self, limit: int) -> torch.Tensor | None:
        return None  # xgrammar fills a fresh mask per state, no ids cached per mask class to list: dense

    def _current_mask(self) -> torch.Tensor:
        if self._mask is None:
            mask = torch.empty(1, self.compiled.non_eos.numel(), dtype=torch.int32)  # [1, W]
            self.m.fill_next_token_bitmask(mask, 0)
            self._mask = mask[0] if self.compiled.legal is None else mask[0] & self.compiled.legal
        return self._mask

    def is_terminated(self) -> bool:
        if self.m.is_terminated():
            return True
        if not self.m.is_completed():
            return False
        return not bool((self._current_mask() & self.compiled.non_eos).any())

    def forced_bytes(self) -> bytes:
        if self.m.is_terminated() or self.m.is_completed():
            return b""
        try:
            return self.m.find_jump_forward_string().encode("utf-8")
        except UnicodeDecodeError:  # xgrammar returns a str: the forced bytes end a partial character
            return b""  # an under-approximation: nothing is jumped over, nothing wrong is forced

    def rollback(self, k: int) -> None:
        if k < 0 or k > self.n_accepted:
            raise ValueError(f"cannot roll back {k} tokens: only {self.n_accepted} were accepted")
        if k:
            self.m.rollback(k)
            self.n_accepted -= k
            self._mask = None

    def copy(self) -> XGrammarGrammar:
        other = XGrammarGrammar(self.compiled, self.m.fork())
        other.n_accepted = self.n_accepted
        other._mask = self._mask  # never written in place: safe to share
        return other
