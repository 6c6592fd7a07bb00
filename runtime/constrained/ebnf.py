"""EBNF grammars (GBNF, or Lark's own syntax) as per-request token masks, on LALR(1) tables.

    compile_grammar(kind, source, vocab) -> CompiledEbnf  ->  .matcher() -> EbnfGrammar per request

The rules come from ebnf_gbnf.py (GBNF, without Lark) or from Lark's grammar loader (Lark syntax),
the tables from lalr.py (Lark's tables, built faster). A position is a set of configurations
(LALR stack, lexer state): the stack is the LALR(1) parser's state stack (interned, so a
configuration is one int), the lexer state is a byte DFA state of the terminal being read.
Lexing is nondeterministic: a lexeme may end wherever its terminal accepts, and the next one
starts on the same byte, so a token can close one terminal and open the next, overlapping
terminals are all tried, and the language is the grammar's own (what Earley with a complete
dynamic lexer accepts), not a longest-match lexer's subset.

Masks (ebnf_masks.EbnfMasks) are computed without re-lexing each token: per lexer state a scan of
the vocabulary's trie gives the tokens that stay inside the lexeme, and only those that cross a
lexeme end are walked against the parser.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import lark
import numpy as np
import torch
from lark.load_grammar import load_grammar

from loom.runtime.constrained.counted_scan import mark_string_states, warm_counts
from loom.runtime.constrained.counted_scan import warm as warm_counted
from loom.runtime.constrained.dfa import ByteDFA, terminal_dfa
from loom.runtime.constrained.ebnf_gbnf import LARK_PARSER as gbnf_parser
from loom.runtime.constrained.ebnf_gbnf import gbnf_rules
from loom.runtime.constrained.ebnf_masks import EbnfMasks
from loom.runtime.constrained.ebnf_scan import available as lexeme_scan_available
from loom.runtime.constrained.ebnf_walk import native_stacks
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lalr import LalrTable, Rule, lalr_table
from loom.runtime.constrained.lark_imports import install as install_import_cache
from loom.runtime.constrained.lark_imports import warm_library
from loom.runtime.constrained.lark_plain import plain_lark
from loom.runtime.constrained.matcher import TokenMatcher
from loom.runtime.constrained.regex_syntax import category_ranges
from loom.runtime.constrained.token_walk import available as walk_available
from loom.runtime.constrained.token_walk import token_trie
from loom.runtime.constrained.vocabulary import TokenVocab

EBNF_KINDS = ("ebnf", "lark")
MAX_CONFIGS = 512  # a position with more (stack, lexer) configurations keeps the first ones: sound, maybe incomplete
MAX_FORCED = 256  # forced_bytes stops after this many (a grammar may force an endless string)
WARM_COUNTS_S = 0.03  # compile time taken for counted strings' scans ahead (warm_counts): a long string's are ~10 ms
PRESCAN_SHARE = 0.1  # lexer-state scans are taken ahead for at most this share of the compile's own time (EbnfMasks.prescan),
PRESCAN_MAX_S = 0.1  # and at most this long (a compile near its timeout is not pushed past it)
_CACHE_LIMIT = 200_000  # memo entries before a memo is cleared (positions are recomputed on demand)

# Lark's common.lark spells ESCAPED_STRING with a look-behind, which has no automaton; this is
# the same set of lexemes: quoted, no raw newline, every backslash escapes the next character.
_EQUIVALENT_PATTERNS = {r'".*?(?<!\\)(\\\\)*?"': r'"(?:[^"\\\n]|\\[^\n])*"'}


class GrammarTables(NamedTuple):
    """What the masks read of a grammar: its terminals' regexes, the ignored terminals' names, and
    the LALR(1) parse table of its rules (lalr.py)."""

    terminals: list[tuple[str, str]]  # (name, regex)
    ignore_tokens: list[str]
    parse_table: LalrTable
    start: str  # the start rule, as the user named it


def lark_tables(source: str) -> GrammarTables:
    """A Lark grammar's tables (start rule `start`): a grammar in the common syntax read by lark_plain,
    any other by Lark's grammar loader and its EBNF -> BNF compile (not the rest of a `lark.Lark`:
    its lexer's regexes, its tree builder's callbacks); then lalr.py."""
    start = "start"
    plain = plain_lark(source)
    try:
        compiled = plain.compile() if plain is not None else None
    except GrammarError as e:  # (too many alternatives; the same alternative twice)
        raise _grammar_error(str(e), "lark", {}, e.kind) from None
    if compiled is not None:
        terminals, rules, ignore = compiled
        return GrammarTables(terminals, ignore, _table(rules, start, "lark", {}), start)
    install_import_cache()  # (`%import common.X` reads Lark's library once per process)
    try:
        grammar, _ = load_grammar(source, "<string>", [], False)
        terminals, rules, ignore = grammar.compile([start], set())
    except lark.exceptions.LarkError as e:
        raise _grammar_error(str(e), "lark", {}) from None
    bnf = [Rule(r.origin.name, tuple(s.name for s in r.expansion), r.options.priority or 0) for r in rules]
    return GrammarTables([(t.name, t.pattern.to_regexp()) for t in terminals], ignore, _table(bnf, start, "lark", {}), start)


def gbnf_tables(source: str) -> GrammarTables:
    """A GBNF grammar's tables: its rules over regex terminals (ebnf_gbnf), then lalr.py."""
    translated = gbnf_rules(source)
    try:
        rules = translated.rules()
    except GrammarError as e:  # (too many alternatives)
        raise _grammar_error(str(e), "ebnf", translated.rule_names, e.kind) from None
    table = _table(rules, translated.start, "ebnf", translated.rule_names)
    return GrammarTables(translated.terminals, [], table, translated.rule_names[translated.start])


def _table(rules: list[Rule], start: str, kind: str, rule_names: dict[str, str]) -> LalrTable:
    try:
        return lalr_table(rules, start)
    except GrammarError as e:  # (a reduce/reduce collision)
        raise _grammar_error(str(e), kind, rule_names) from None


def _grammar_error(msg: str, kind: str, rule_names: dict[str, str], error_kind: ErrorKind = ErrorKind.INVALID) -> GrammarError:
    """A grammar's error from Lark or the table builder, naming the user's rules."""
    for lark_name, name in sorted(rule_names.items(), key=lambda kv: -len(kv[0])):
        msg = msg.replace(lark_name, name)
    if "Reduce/Reduce collision" in msg:
        msg += "\n(the grammar must be LALR(1) once its regular rules are folded into terminals; make the alternatives differ earlier)"
    return GrammarError(f"{kind} grammar: {msg.strip()}", error_kind)


class CompiledEbnf:
    """A grammar's LALR table, terminal automata and caches, shared by every request using it.

    Masks and memos are filled lazily from the scheduler's thread (the one thread that steps
    requests); compilation itself runs on a backend worker."""

    def __init__(self, tables: GrammarTables, vocab: TokenVocab, kind: str = "lark", terminal_dfas: dict[str, ByteDFA] | None = None) -> None:
        """tables: lark_tables(source) or gbnf_tables(source). terminal_dfas: automata to use
        instead of the named terminals' regexes (languages a regex cannot spell, such as
        JSON-Schema keys matching no pattern); the regex stays the grammar's."""
        self.kind = kind
        self.vocab = vocab
        table = tables.parse_table

        # terminals -> byte DFAs; lexer states get grammar-wide ids (one config = stack * n + lexer id)
        self.terminal_names = [name for name, _ in tables.terminals]
        index = {name: k for k, name in enumerate(self.terminal_names)}
        self.ignored = frozenset(index[n] for n in tables.ignore_tokens)
        self.dfas: list[ByteDFA] = []
        for name, pattern in tables.terminals:
            dfa = (terminal_dfas or {}).get(name) or terminal_dfa(_EQUIVALENT_PATTERNS.get(pattern, pattern), f"{kind} grammar: terminal {name}")
            if dfa.accepting[0]:
                raise GrammarError(
                    f"{kind} grammar: terminal {name} (/{pattern}/) matches the empty string; terminals must match at least one character"
                )
            if dfa.dead == 0:
                raise GrammarError(f"{kind} grammar: terminal {name} (/{pattern}/) matches nothing")
            self.dfas.append(dfa)
        self.offsets: list[int] = []
        self.accepting: list[bool] = []
        self.lex_terminal: list[int] = []
        self._lex_rows: list[list[int]] = []  # lexer id -> its 256 next states in its terminal's numbers (-1: dead; the automaton's own lists)
        blocks: list[np.ndarray] = []
        base = 0
        for k, dfa in enumerate(self.dfas):
            rows, block, accepting = _lexer_rows(dfa)
            self.offsets.append(base)
            self._lex_rows += rows
            blocks.append(np.where(block < 0, np.int32(-1), block + np.int32(base)))
            self.accepting += accepting
            self.lex_terminal += [k] * len(rows)
            base += len(rows)
        self.trans_table = np.concatenate(blocks) if blocks else np.zeros((0, 256), dtype=np.int32)  # [boundary, 256] (C reads this)
        self.boundary = base  # "between lexemes": only at the very start
        self.n_lex = self.boundary + 1
        self.max_configs = MAX_CONFIGS
        self._first_bytes: dict[int, frozenset[int]] = {}  # lexer id -> the bytes it reads (filled on demand)

        # the LALR table: per state, terminal index -> ("shift", state) / ("reduce", (nonterminal, size))
        self._end = len(self.terminal_names)
        self._actions: dict[int, dict[int, tuple[bool, object]]] = {}
        self._goto: dict[int, dict[str, int]] = {}
        for state, acts in enumerate(table.actions):
            a: dict[int, tuple[bool, object]] = {}
            g: dict[str, int] = {}
            for sym, (is_shift, arg) in acts.items():
                if sym == "$END":
                    a[self._end] = (is_shift, arg)
                elif sym in index:
                    a[index[sym]] = (is_shift, arg)
                else:
                    g[sym] = arg  # type: ignore[assignment]
            self._actions[state] = a
            self._goto[state] = g
        self._end_state = table.end_state

        # interned stacks: id -> (top state, parent id); in C where it is compiled (the crossing walk
        # fills new stacks' rows there), else in these lists
        self.stacks = native_stacks(self._actions, self._goto, self._end + 1, self.ignored, table.start_state, self._end_state)
        self._top: list[int] = [table.start_state]
        self._parent: list[int] = [-1]
        self._interned: dict[tuple[int, int], int] = {}

        self._after: dict[tuple[int, int], int | None] = {}
        self._startable: dict[int, tuple[int, ...]] = {}
        self._can_end: dict[int, bool] = {}
        self._signature: dict[int, int] = {}
        self._signatures: dict[tuple[tuple[int, bool], ...], int] = {}
        self._step1: dict[int, tuple[int, ...]] = {}
        self._step: dict[tuple[frozenset[int], int], frozenset[int]] = {}
        self._forced: dict[frozenset[int], bytes] = {}
        self.initial: frozenset[int] = frozenset({0 * self.n_lex + self.boundary})
        self.masks = EbnfMasks(self)
        if not self.startable(0) and not self.stack_can_end(0):
            raise GrammarError(f"{kind} grammar: the start rule {tables.start!r} matches nothing", ErrorKind.EMPTY)

    def matcher(self) -> EbnfGrammar:
        return EbnfGrammar(self)

    @property
    def nbytes(self) -> int:
        """What this compiled grammar holds, roughly: its lexer table and the masks computed so far."""
        return self.trans_table.nbytes + self.masks.nbytes + (self.stacks.nbytes if self.stacks is not None else 0)

    # ------------------------------------------------------------------ the parser
    def _push(self, parent: int, state: int) -> int:
        key = (parent, state)
        sid = self._interned.get(key)
        if sid is None:
            sid = self._interned[key] = len(self._top)
            self._top.append(state)
            self._parent.append(parent)
        return sid

    @property
    def num_stacks(self) -> int:
        """How many stacks are interned."""
        return self.stacks.count if self.stacks is not None else len(self._top)

    def _feed(self, sid: int, terminal: int) -> int | None:
        """The stack after shifting `terminal` (reducing first as LALR does); None: not acceptable.
        For the end marker, returns the stack on acceptance (reduced to the end state)."""
        if self.stacks is not None:
            after = self.stacks.feed(sid, terminal)
            return after if after >= 0 else None
        while True:
            act = self._actions[self._top[sid]].get(terminal)
            if act is None:
                return None
            is_shift, arg = act
            if is_shift:
                return self._push(sid, arg)  # type: ignore[arg-type]
            origin, size = arg  # type: ignore[misc]
            for _ in range(size):
                sid = self._parent[sid]
            sid = self._push(sid, self._goto[self._top[sid]][origin])
            if terminal == self._end and self._top[sid] == self._end_state:
                return sid

    def after(self, sid: int, terminal: int) -> int | None:
        """The stack once a lexeme of `terminal` is complete (ignored terminals leave it as is)."""
        if terminal in self.ignored:
            return sid
        key = (sid, terminal)
        if key not in self._after:
            self._after[key] = self._feed(sid, terminal)
        return self._after[key]

    def startable(self, sid: int) -> tuple[int, ...]:
        """Terminals a new lexeme may be of at this stack: shiftable ones plus the ignored."""
        out = self._startable.get(sid)
        if out is None:
            acts = self._actions[self.stacks.top(sid) if self.stacks is not None else self._top[sid]]
            out = tuple(sorted({t for t in acts if t != self._end and self.after(sid, t) is not None} | self.ignored))
            self._startable[sid] = out
        return out

    def signature(self, sid: int) -> int:
        """What a walk from a lexeme boundary at this stack reads of it while every lexeme it
        completes leaves the stack as it is (ebnf_walk's shallow walks): the terminals startable
        here, and which of them leave it so (ignored ones). Stacks of one signature (an interned
        id) share those walks' verdicts: a maxLength string's chunk counts, or a schema's objects
        of one shape at different depths."""
        out = self._signature.get(sid)
        if out is None:
            key = tuple((t, self.after(sid, t) == sid) for t in self.startable(sid))
            out = self._signature[sid] = self._signatures.setdefault(key, len(self._signatures))
        return out

    def stack_can_end(self, sid: int) -> bool:
        if sid not in self._can_end:
            self._can_end[sid] = self._feed(sid, self._end) is not None
        return self._can_end[sid]

    # ------------------------------------------------------------------ the lexer over bytes
    def _step_one(self, config: int, byte: int) -> tuple[int, ...]:
        key = config * 256 + byte
        out = self._step1.get(key)
        if out is not None:
            return out
        sid, lex = divmod(config, self.n_lex)
        res: list[int] = []
        if lex == self.boundary:
            starts: int | None = sid
        else:
            k = self.lex_terminal[lex]
            nxt = self._lex_rows[lex][byte]
            if nxt >= 0:
                res.append(sid * self.n_lex + self.offsets[k] + nxt)
            starts = self.after(sid, k) if self.accepting[lex] else None
        if starts is not None:
            base = starts * self.n_lex
            for t in self.startable(starts):
                nxt = self._lex_rows[self.offsets[t]][byte]
                if nxt >= 0:
                    res.append(base + self.offsets[t] + nxt)
        out = self._step1[key] = tuple(res)
        return out

    def step(self, configs: frozenset[int], byte: int) -> frozenset[int]:
        key = (configs, byte)
        out = self._step.get(key)
        if out is None:
            if len(self._step) > _CACHE_LIMIT:
                self._step.clear()
                self._step1.clear()
            found: set[int] = set()
            for c in configs:
                found.update(self._step_one(c, byte))
            if len(found) > self.max_configs:
                found = set(sorted(found)[: self.max_configs])
            out = self._step[key] = frozenset(found)
        return out

    def walk(self, configs: frozenset[int], data: bytes) -> frozenset[int]:
        for b in data:
            configs = self.step(configs, b)
            if not configs:
                break
        return configs

    def can_end(self, configs: frozenset[int]) -> bool:
        for c in configs:
            sid, lex = divmod(c, self.n_lex)
            if lex == self.boundary:
                if self.stack_can_end(sid):
                    return True
            elif self.accepting[lex]:
                after = self.after(sid, self.lex_terminal[lex])
                if after is not None and self.stack_can_end(after):
                    return True
        return False

    def lexemes(self, config: int) -> tuple[int, list[int]]:
        """(stack, the lexer ids a configuration stands for: itself, or every lexeme that may start)."""
        sid, lex = divmod(config, self.n_lex)
        if lex == self.boundary:
            return sid, [self.offsets[t] for t in self.startable(sid)]
        return sid, [lex]

    # ------------------------------------------------------------------ masks
    def mask(self, configs: frozenset[int]) -> tuple[torch.Tensor, bool]:
        """-> (packed mask [ceil(V / 32)] int32, whether any non-EOS token is allowed); see ebnf_masks."""
        return self.masks.mask(configs)

    def first_bytes(self, lex: int) -> frozenset[int]:
        """The bytes lexer state `lex` reads without dying."""
        found = self._first_bytes.get(lex)
        if found is None:
            found = self._first_bytes[lex] = frozenset(np.flatnonzero(self.trans_table[lex] >= 0).tolist())
        return found

    def next_bytes(self, configs: frozenset[int]) -> frozenset[int]:
        found: set[int] = set()
        for c in configs:
            sid, lexes = self.lexemes(c)
            for lex in lexes:
                found |= self.first_bytes(lex)
                if self.accepting[lex] and c % self.n_lex != self.boundary:
                    after = self.after(sid, self.lex_terminal[lex])
                    if after is not None:
                        for t in self.startable(after):
                            found |= self.first_bytes(self.offsets[t])
        return frozenset(found)

    def forced_bytes(self, configs: frozenset[int]) -> bytes:
        out = self._forced.get(configs)
        if out is None:
            buf = bytearray()
            cur = configs
            while len(buf) < MAX_FORCED and cur and not self.can_end(cur):
                nxt = self.next_bytes(cur)
                if len(nxt) != 1:
                    break
                (b,) = nxt
                buf.append(b)
                cur = self.step(cur, b)
            out = self._forced[configs] = bytes(buf)
        return out


def _lexer_rows(dfa: ByteDFA) -> tuple[list[list[int]], np.ndarray, list[bool]]:
    """A terminal's live states as the lexer reads them: their rows as lists and as int32 [live, 256]
    (-1: dead), and whether each accepts; kept with the automaton (a grammar's lexer is these rows
    renumbered, and building the lists took ~0.5 ms of a JSON grammar's compile)."""
    held = dfa.derived.get("rows")
    if held is None:
        block = dfa.table[: dfa.dead].astype(np.int32)
        block[block == dfa.dead] = -1
        held = dfa.derived["rows"] = (block.tolist(), block, dfa.accepting[: dfa.dead].astype(bool).tolist())
    return held


class EbnfGrammar(TokenMatcher):
    """One request's position in a compiled EBNF grammar (the matcher of matcher.TokenMatcher, as
    RegexGrammar): a state is a set of configurations; it may end where the grammar may."""

    compiled: CompiledEbnf

    def __init__(self, compiled: CompiledEbnf) -> None:
        super().__init__(compiled, compiled.initial, compiled.vocab.eos_token_ids)

    def _next(self, state: frozenset[int], token_id: int) -> frozenset[int] | None:
        data = self.compiled.vocab.by_id.get(token_id)
        if data is None:
            return None
        return self.compiled.walk(state, data) or None

    def _can_end(self, state: frozenset[int]) -> bool:
        return self.compiled.can_end(state)


def warm_up(vocab: TokenVocab) -> None:
    """What a process pays once, before its first grammar over `vocab` (GrammarBackend's set-up runs
    it with the vocabulary's): the token trie and its string profile (counted_scan.warm), Unicode's
    \\d \\s \\w (~20-30 ms each), the patterns of Lark's `common` library (~10 ms), Lark's own
    loader for grammars lark_plain leaves to it (its parser; a first grammar took ~15 ms more than
    the next), the GBNF translation, and Lark's GBNF parser, which reads what read_gbnf refuses
    to say what is wrong (Lark builds its lexers per parser state as a first text reaches it)."""
    for category in ("DIGIT", "SPACE", "WORD"):
        category_ranges(category, False)
    warm_library(("common",))
    compile_grammar("lark", _WARM_UP_LARK, vocab)
    lark_tables(_WARM_UP_LARK + "\n%declare UNUSED")  # (outside lark_plain's subset: Lark's loader)
    gbnf_rules(_WARM_UP_GBNF)
    gbnf_parser.parse(_WARM_UP_GBNF)


_WARM_UP_LARK = "start: WORD (WS WORD)*\n%import common.WORD\n%import common.WS"
_WARM_UP_GBNF = r"""# every construct, in every place it may come
root ::= item ("," ws item)* | "[" [^\]\\]? "]" ws | ( "a" | . )+ root? | item{1,3} | [0-9]{2,} "x"*
item ::= "\"" [a-z\x41-\u005A]* "\"" ws | (item) | ws
ws ::= [ \t\n]{0,2}
"""


def compile_grammar(kind: str, source: str, vocab: TokenVocab, terminal_dfas: dict[str, ByteDFA] | None = None) -> CompiledEbnf:
    """kind "ebnf" (GBNF, start rule `root`) or "lark" (Lark syntax, start rule `start`).
    Raises GrammarError naming the line or rule and what was expected."""
    started = time.monotonic()
    if kind == "ebnf":
        compiled = CompiledEbnf(gbnf_tables(source), vocab, "ebnf")
    elif kind == "lark":
        compiled = CompiledEbnf(lark_tables(source), vocab, "lark", terminal_dfas=terminal_dfas)
    else:
        raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {EBNF_KINDS}")
    # Warm up here, on the compiling thread, not the scheduler's: the vocabulary's trie (once per
    # vocabulary), the first mask, and the lexer states' scans while a share of the compile's time lasts.
    if walk_available():
        token_trie(vocab)
        warm_counted(vocab)  # (the vocabulary's tokens read as string characters: counted_scan)
        deadline = time.monotonic() + WARM_COUNTS_S
        for dfa in compiled.dfas:  # and which lexer states are a string's contents
            if not dfa.string_states:
                mark_string_states(dfa)
            if dfa.counted is not None:  # and a counted string's scans, count by count (while time lasts)
                warm_counts(vocab, dfa.counted, deadline)
    compiled.mask(compiled.initial)
    if lexeme_scan_available():  # (a large grammar's first masks scan dozens of new lexer states each: ~30 us a state)
        compiled.masks.prescan(time.monotonic() + min(PRESCAN_SHARE * (time.monotonic() - started), PRESCAN_MAX_S))
    return compiled
