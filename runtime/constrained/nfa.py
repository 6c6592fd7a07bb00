"""Python regexes as byte-level automata: the NFA that regex_dfa.py determinises (regexes, JSON
schemas) and ebnf.terminal_dfa minimises (an EBNF grammar's terminals), and the ByteDFA they run on.

    build_nfa(pattern) -> (Thompson NFA over UTF-8 byte ranges, start, final)
    ByteDFA(table [S + 1, 256] int32, accepting [S + 1] bool); row S is dead

Tokens are byte strings and may split a UTF-8 character, so the automaton reads bytes: every
character set is compiled to the UTF-8 byte sequences of its code-point ranges (as Rust's
regex-syntax does), then Thompson NFA -> subset construction -> Moore minimisation. Matching is
whole-string (a lexeme either is in the terminal's language or not); lazy quantifiers read as
greedy ones, which match the same set of strings. Look-arounds, anchors and back-references have
no automaton and raise GrammarError.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

from loom.runtime.constrained.errors import GrammarError

try:  # the stdlib's own regex parser (public as sre_parse before 3.11)
    import re._constants as _c
    import re._parser as _p
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

MAX_CODEPOINT = 0x10FFFF
MAX_NFA_STATES = 200_000  # past this the DFA would take too long to build; the grammar is refused
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code-point ranges

_ALL: Ranges = [(0, 0xD7FF), (0xE000, MAX_CODEPOINT)]  # every code point UTF-8 can encode


@dataclass(frozen=True, slots=True)
class ByteDFA:
    """A minimal DFA over bytes. State 0 starts; state `dead` (the last row) never accepts."""

    table: np.ndarray  # [S + 1, 256] int32
    accepting: np.ndarray  # [S + 1] bool

    @property
    def dead(self) -> int:
        return self.table.shape[0] - 1

    def matches(self, data: bytes) -> bool:
        q = 0
        for b in data:
            q = int(self.table[q, b])
        return bool(self.accepting[q])


# ----------------------------------------------------------------------------- character sets


def _normalise(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges: Ranges) -> Ranges:
    out: Ranges = []
    nxt = 0
    for lo, hi in _normalise(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return _intersect_all(out)


def _intersect_all(ranges: Ranges) -> Ranges:
    """Drop the surrogates, which have no UTF-8 encoding."""
    out: Ranges = []
    for lo, hi in ranges:
        for a, b in _ALL:
            if max(lo, a) <= min(hi, b):
                out.append((max(lo, a), min(hi, b)))
    return out


@functools.cache
def _category(name: str, ascii_only: bool) -> tuple[tuple[int, int], ...]:
    """\\d, \\s, \\w as Python's str regexes read them (Unicode unless re.ASCII)."""
    test = {"DIGIT": str.isdecimal, "SPACE": str.isspace, "WORD": lambda ch: ch.isalnum() or ch == "_"}[name]
    top = 0x7F if ascii_only else MAX_CODEPOINT
    out: Ranges = []
    start = None
    for cp in range(top + 2):
        inside = cp <= top and test(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            out.append((start, cp - 1))
            start = None
    if ascii_only and name == "SPACE":  # re.ASCII's \s is C's isspace, without \x1c-\x1f
        out = [(9, 13), (32, 32)]
    return tuple(out)


def _case_variants(ranges: Ranges) -> Ranges:
    extra: Ranges = []
    for lo, hi in ranges:
        for cp in range(lo, min(hi, lo + 4096) + 1):  # wide ranges fold mostly into themselves
            ch = chr(cp)
            for v in {ch.lower(), ch.upper(), ch.swapcase()}:
                if len(v) == 1:
                    extra.append((ord(v), ord(v)))
    return _normalise(ranges + extra)


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Code points [lo, hi] -> UTF-8 byte-range sequences whose union is exactly their encodings."""
    for boundary in (0x7F, 0x7FF, 0xFFFF):  # one encoded length per piece
        if lo <= boundary < hi:
            return _utf8_sequences(lo, boundary) + _utf8_sequences(boundary + 1, hi)
    if hi <= 0x7F:
        return [[(lo, hi)]]
    n = 2 if hi <= 0x7FF else 3 if hi <= 0xFFFF else 4
    for i in range(1, n):  # split until every continuation byte below the first differing one spans 80..BF
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                return _utf8_sequences(lo, lo | m) + _utf8_sequences((lo | m) + 1, hi)
            if hi & m != m:
                return _utf8_sequences(lo, (hi & ~m) - 1) + _utf8_sequences(hi & ~m, hi)
    a, b = chr(lo).encode(), chr(hi).encode()
    return [list(zip(a, b))]


# ----------------------------------------------------------------------------- NFA


class _NFA:
    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int, int]]] = []  # state -> [(byte lo, byte hi, target)]
        self.eps: list[list[int]] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise GrammarError(f"a terminal's automaton needs more than {MAX_NFA_STATES} states; use smaller repetition bounds")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def charset(self, ranges: Ranges) -> tuple[int, int]:
        start, end = self.state(), self.state()
        for lo, hi in _normalise(ranges):
            for seq in _utf8_sequences(lo, hi):
                cur = start
                for k, (a, b) in enumerate(seq):
                    nxt = end if k == len(seq) - 1 else self.state()
                    self.edges[cur].append((a, b, nxt))
                    cur = nxt
        return start, end


def _build(nfa: _NFA, items: list, flags: int, where: str) -> tuple[int, int]:
    """A parsed regex (sre's list of (op, arg)) -> (start, end) NFA fragment."""
    start = cur = nfa.state()
    for op, av in items:
        s, e = _build_one(nfa, op, av, flags, where)
        nfa.eps[cur].append(s)
        cur = e
    return start, cur


def _set_of(op: object, av: object, flags: int, where: str) -> Ranges:
    ascii_only = bool(flags & re.ASCII)
    if op is _c.LITERAL:
        return [(av, av)]  # type: ignore[list-item]
    if op is _c.RANGE:
        return [av]  # type: ignore[list-item]
    if op is _c.CATEGORY:
        name = str(av).removeprefix("CATEGORY_")
        negated = name.startswith("NOT_")
        base = list(_category(name.removeprefix("NOT_"), ascii_only))
        return _complement(base) if negated else base
    raise GrammarError(f"{where}: unsupported character-class item {op} {av!r}")


def _build_one(nfa: _NFA, op: object, av: object, flags: int, where: str) -> tuple[int, int]:
    icase = bool(flags & re.IGNORECASE)
    if op in (_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY):
        if op is _c.ANY:
            ranges = list(_ALL) if flags & re.DOTALL else _complement([(10, 10)])
        elif op is _c.IN:
            items = list(av)  # type: ignore[call-overload]
            negate = bool(items) and items[0][0] is _c.NEGATE
            ranges = _normalise([r for o, a in items[negate:] for r in _set_of(o, a, flags, where)])
            if icase:
                ranges = _case_variants(ranges)
            if negate:
                ranges = _complement(ranges)
        else:
            ranges = [(av, av)]  # type: ignore[list-item]
            if icase:
                ranges = _case_variants(ranges)
            if op is _c.NOT_LITERAL:
                ranges = _complement(ranges)
        return nfa.charset(_intersect_all(ranges))
    if op is _c.SUBPATTERN:
        _group, add, remove, sub = av  # type: ignore[misc]
        return _build(nfa, sub.data, (flags | add) & ~remove, where)
    if op is _c.BRANCH:
        start, end = nfa.state(), nfa.state()
        for alt in av[1]:  # type: ignore[index]
            s, e = _build(nfa, alt.data, flags, where)
            nfa.eps[start].append(s)
            nfa.eps[e].append(end)
        return start, end
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)):
        lo, hi, sub = av  # type: ignore[misc]
        start = cur = nfa.state()
        for _ in range(lo):
            s, e = _build(nfa, sub.data, flags, where)
            nfa.eps[cur].append(s)
            cur = e
        if hi is _c.MAXREPEAT:
            s, e = _build(nfa, sub.data, flags, where)
            nfa.eps[cur] += [s]
            nfa.eps[e] += [s]
            end = nfa.state()
            nfa.eps[cur].append(end)
            nfa.eps[e].append(end)
            return start, end
        end = nfa.state()
        for _ in range(hi - lo):
            nfa.eps[cur].append(end)
            s, e = _build(nfa, sub.data, flags, where)
            nfa.eps[cur].append(s)
            cur = e
        nfa.eps[cur].append(end)
        return start, end
    names = {_c.AT: "anchors (^, $, \\b)", _c.ASSERT: "look-aheads / look-behinds", _c.ASSERT_NOT: "look-aheads / look-behinds", _c.GROUPREF: "back-references"}
    what = names.get(op, str(op))  # type: ignore[call-overload]
    raise GrammarError(f"{where}: {what} cannot be compiled to an automaton; rewrite the terminal without them")


def build_nfa(pattern: str, where: str = "regex") -> tuple[_NFA, int, int]:
    """A Python regex -> (Thompson NFA over UTF-8 byte ranges, start state, final state); shared
    with regex_dfa.py, which determinises it over byte classes. Raises GrammarError for syntax
    errors and constructs with no automaton (look-arounds, anchors, back-references)."""
    try:
        parsed = _p.parse(pattern, 0)
    except re.error as e:
        raise GrammarError(f"{where}: invalid regex {pattern!r}: {e}") from None
    nfa = _NFA()
    start, final = _build(nfa, parsed.data, parsed.state.flags, where)
    return nfa, start, final
