"""Compiling grammars off the scheduler's thread, bounded in size, time and memory.

    backend.compile(kind, source) -> Future[compiled grammar]  (cached by (kind, source), LRU)
    compiled.matcher()            -> a per-request Grammar (grammar.py)

The scheduler keeps a request whose future is not done aside and polls it each step, so a slow
compilation never stalls the batch. Futures that fail carry a `GrammarError` naming the problem.

Bounds (issue 19: a 58-byte schema held a compile thread for minutes):
- size: `limits.check_source` refuses, before anything is built, a source whose string lengths,
  item counts, repetitions, nesting or unrolled regex are past `GrammarLimits` (kind TOO_LARGE,
  the message naming the keyword and the limit);
- time: a compile runs as a `CompileJobs` job: stopped at `compile_timeout_s`, or as soon as no
  request holds its future (aborted, answered, timed out in the scheduler);
- memory: finished compilations (and refusals) are kept in an LRU bounded both by count
  (`cache_size`) and by bytes (`cache_bytes`, each compiled grammar's `nbytes`, its masks
  included); each compiled grammar bounds its own mask caches too (regex_dfa.py, ebnf.py).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from loom.runtime.constrained.compile_jobs import CompileJobs, CompileStopped
from loom.runtime.constrained.ebnf import EBNF_KINDS, CompiledEbnf, compile_grammar, warm_up
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.json_regex import DEFAULT_WHITESPACE
from loom.runtime.constrained.limits import GrammarLimits, check_source
from loom.runtime.constrained.regex_dfa import CompiledRegex
from loom.runtime.constrained.schema import RegexTooLong, schema_regexes, schema_to_regex
from loom.runtime.constrained.schema_grammar import schema_to_grammar
from loom.runtime.constrained.vocabulary import TokenVocab
from loom.runtime.server_args import grammar_backend_name

GRAMMAR_KINDS = ("regex", "json_schema", "ebnf", "lark")
# A JSON Schema whose regex is longer than this goes to the grammar path without trying the DFA (a
# 27M-character regex took over 3 minutes to refuse; the largest MaskBench one that compiles is 1.4M).
MAX_SCHEMA_REGEX_CHARS = 4_000_000
# Past this, the grammar path is tried first: its compile stays at tens of ms where the DFA's (the
# regex parsed and its NFA built in Python) grows with the regex, ~1.5-3 ms per 1,000 characters
# (JSONSchemaBench at a 128k vocabulary: 70k-126k characters, 37-435 ms against 11-33; a 426k
# Kubernetes schema: 600 ms against 32; a 3.9M one: 8 s against 0.34 s), and its masks' p99 stays
# under 1 ms (0.45-0.81 ms there, against the DFA's 0.18-0.44). Below it the two compile alike
# (20-50k characters: 17-135 ms against 19-110) and the DFA's masks are the cheaper.
GRAMMAR_FIRST_CHARS = 60_000
CACHE_BYTES = 512 << 20  # compiled grammars kept (tables and masks), least recently used dropped first


def grammar_source(params: Any) -> tuple[str, str] | None:
    """(kind, source) of the grammar a request's SamplingParams asks for, or None."""
    for kind in GRAMMAR_KINDS:
        source = getattr(params, kind)
        if source is not None:
            return kind, source
    return None


class GrammarBackend:
    """The compilers of one grammar backend over one vocabulary, run on a thread pool."""

    def __init__(
        self,
        token_bytes: Callable[[], dict[int, bytes]] | dict[int, bytes],
        vocab_size: int,
        eos_token_ids: frozenset[int],
        *,
        max_workers: int = 2,
        cache_size: int = 128,
        cache_bytes: int = CACHE_BYTES,
        compile_timeout_s: float | None = None,
        whitespace_pattern: str = DEFAULT_WHITESPACE,
        grammar_backend: str = "loom",
        json_open_objects: bool = False,
        limits: GrammarLimits | None = None,
    ) -> None:
        """token_bytes: token id -> bytes (or a function returning it, called once, lazily, on a
        worker thread: loading a tokenizer takes a while). grammar_backend: loom (this package's own
        compilers; `outlines` is an alias), xgrammar or llguidance (their compilers, on the same
        vocabulary); raises ValueError for any other.
        json_open_objects: JSON-Schema objects without `additionalProperties` admit undeclared
        properties, as the spec says (default: only the declared ones; see schema_to_regex).
        limits: the size limits and compile time budget (compile_timeout_s, when given, overrides
        limits.compile_timeout_s)."""
        self.grammar_backend = grammar_backend_name(grammar_backend)
        self._native: Any = None  # the xgrammar / llguidance compiler, built on first use
        self._token_bytes = token_bytes
        self.vocab_size = vocab_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self.limits = limits or GrammarLimits()
        self.compile_timeout_s = self.limits.compile_timeout_s if compile_timeout_s is None else compile_timeout_s
        self.whitespace_pattern = whitespace_pattern
        self.json_open_objects = json_open_objects
        # finished (compiled, or refused) futures; in-flight ones as weak references
        self._cache: OrderedDict[tuple[str, str], Future | weakref.ref] = OrderedDict()
        self._cache_lock = threading.Lock()
        self.jobs = CompileJobs(max_workers)
        self._ebnf_vocab: TokenVocab | None = None
        self._vocab_lock = threading.Lock()

    def compile(self, kind: str, source: str) -> Future:
        """A future of the compiled grammar; the same (kind, source) shares one compilation (and,
        while it runs, one future). Hold the future while the result is wanted: a compilation whose
        future nobody holds any more is stopped (so is one past `compile_timeout_s`; its future then
        fails with a GrammarError)."""
        key = (kind, source)
        with self._cache_lock:
            entry = self._cache.get(key)
            fut = entry() if isinstance(entry, weakref.ref) else entry
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
        fut = self.jobs.submit(key, lambda: self._compile(kind, source), self.compile_timeout_s)
        with self._cache_lock:  # in flight: held weakly here, so that dropping it stops the compile
            self._cache[key] = weakref.ref(fut)
            self._trim()
        fut.add_done_callback(lambda f: self._keep(key, f))
        return fut

    def _keep(self, key: tuple[str, str], fut: Future) -> None:
        """A finished compilation stays in the cache, held; a stopped one or a crash leaves it (it is
        retried next time)."""
        exc = fut.exception()
        final = exc is None or (isinstance(exc, GrammarError) and not isinstance(exc, CompileStopped))
        with self._cache_lock:
            entry = self._cache.get(key)
            if entry is None or (entry() if isinstance(entry, weakref.ref) else entry) is not fut:
                return  # dropped meanwhile (LRU, forget) or replaced
            if final:
                self._cache[key] = fut
                self._trim()
            else:
                del self._cache[key]

    def _trim(self) -> None:
        """(holding _cache_lock) Drop the least recently used entries past cache_size or cache_bytes."""
        total = sum(_nbytes(e) for e in self._cache.values())
        while self._cache and (len(self._cache) > self.cache_size or total > self.cache_bytes):
            _, entry = self._cache.popitem(last=False)
            total -= _nbytes(entry)

    def cached_bytes(self) -> int:
        """What the cached compilations hold now (tables and masks), in bytes."""
        with self._cache_lock:
            return sum(_nbytes(e) for e in self._cache.values())

    def forget(self, kind: str, source: str) -> None:
        """Drop a cache entry and stop its compilation if it is running (a compilation that timed out
        is retried from scratch next time)."""
        with self._cache_lock:
            self._cache.pop((kind, source), None)
        self.jobs.cancel((kind, source), f"{kind} took longer than {self.compile_timeout_s:g}s to compile; simplify it")

    def _compile(self, kind: str, source: str) -> CompiledRegex | CompiledEbnf:
        if kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")
        check_source(kind, source, self.limits)
        if self.grammar_backend != "loom":  # regex, json_schema, ebnf (GBNF) and lark, each natively
            return self._native_compiler().compile(kind, source)
        pieces = None
        if kind == "regex":
            regex = source
        elif kind == "json_schema":
            try:
                regex, pieces = schema_regexes(source, self.whitespace_pattern, self.json_open_objects, GRAMMAR_FIRST_CHARS)
            except RegexTooLong as e:  # the grammar first; the DFA where only it enforces the schema, up to its limit
                try:
                    return self._grammar_of(source)
                except GrammarError as refused:
                    if e.size > MAX_SCHEMA_REGEX_CHARS:  # parsing it alone takes minutes
                        return self._schema_grammar(source, str(RegexTooLong(e.size, MAX_SCHEMA_REGEX_CHARS)), refused)
                regex, pieces = schema_regexes(source, self.whitespace_pattern, self.json_open_objects)
            except GrammarError as e:
                if e.kind in (ErrorKind.MALFORMED, ErrorKind.EMPTY, ErrorKind.TOO_LARGE):  # no grammar does better
                    raise
                return self._schema_grammar(source, str(e))
        elif kind in EBNF_KINDS:  # GBNF or Lark syntax, on LALR tables (ebnf.py)
            return compile_grammar(kind, source, self._token_vocab())
        else:
            raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")
        try:  # Loom's byte DFA (regex_dfa.py), not outlines-core's Index, built as walks reach its states: a
            # date-time regex's 1,689 states took 15 ms to build whole (llguidance compiles it in 2-4), its
            # first mask reaches 55 (~2 ms). Past MAX_DFA_STATES built, the DFA narrows rather than grows.
            return CompiledRegex(regex, self._token_vocab(), lazy=True, pieces=pieces)
        except GrammarError as e:
            if kind == "json_schema":  # the message shows the schema's regex: say where it came from
                return self._schema_grammar(source, f"json_schema cannot be compiled to an automaton: {e}")
            raise

    def _grammar_of(self, source: str) -> CompiledEbnf:
        """A JSON Schema as a grammar for the EBNF engine (schema_grammar.py)."""
        lark_source, dfas = schema_to_grammar(source, self.whitespace_pattern, self.json_open_objects)
        return compile_grammar("lark", lark_source, self._token_vocab(), terminal_dfas=dfas)

    def _schema_grammar(self, source: str, regex_error: str, refused: GrammarError | None = None) -> CompiledEbnf | CompiledRegex:
        """A JSON Schema the regex path refused, as a grammar for the EBNF engine (recursive $refs,
        large objects, long strings). Where that refuses too (`refused`: it already did) and objects
        are open, the regex of the closed reading (declared properties only: narrower, still sound);
        else both reasons."""
        if refused is None:
            try:
                return self._grammar_of(source)
            except GrammarError as e:
                refused = e
        grammar_error = str(refused)
        if self.json_open_objects:
            try:
                return CompiledRegex(schema_to_regex(source, self.whitespace_pattern, False), self._token_vocab(), lazy=True)
            except GrammarError:
                pass
        raise GrammarError(f"{regex_error[:600]}; as a grammar: {grammar_error[:600]}")

    def _token_vocab(self) -> TokenVocab:
        with self._vocab_lock:
            if self._ebnf_vocab is None:
                vocab = TokenVocab.build(self._resolved_token_bytes(), self.vocab_size, self.eos_token_ids)
                warm_up(vocab)  # the mask walk's trie and what else a process builds once, before the first grammar
                self._ebnf_vocab = vocab
            return self._ebnf_vocab

    def _resolved_token_bytes(self) -> dict[int, bytes]:
        """token_bytes, the function called once (the caller holds _vocab_lock)."""
        if callable(self._token_bytes):
            self._token_bytes = self._token_bytes()
        return self._token_bytes

    def _native_compiler(self) -> Any:
        """The xgrammar or llguidance compiler over this vocabulary (imported here: both are optional)."""
        with self._vocab_lock:
            if self._native is None:
                tb = self._resolved_token_bytes()
                if self.grammar_backend == "xgrammar":
                    from loom.runtime.constrained.xgrammar_backend import XGrammarCompiler as native
                else:
                    from loom.runtime.constrained.llguidance_backend import LLGuidanceCompiler as native
                self._native = native(tb, self.vocab_size, self.eos_token_ids, json_open_objects=self.json_open_objects)
            return self._native

    def shutdown(self) -> None:
        self.jobs.shutdown()


def _nbytes(entry: Future | weakref.ref) -> int:
    """The bytes a finished compilation holds (0 for a refusal, and while it runs)."""
    if isinstance(entry, weakref.ref) or not entry.done() or entry.exception() is not None:
        return 0
    return int(getattr(entry.result(), "nbytes", 0))
