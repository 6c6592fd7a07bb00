"""Python regexes as byte-level NFAs: what dfa.py determinises (regexes, JSON schemas, an EBNF
grammar's terminals).

    build_nfa(pattern) -> (Thompson NFA over UTF-8 byte ranges, start, final)

Tokens are byte strings and may split a UTF-8 character, so the automaton reads bytes: every
character set is compiled to the UTF-8 byte sequences of its code-point ranges (as Rust's
regex-syntax does). Matching is whole-string (a lexeme either is in the terminal's language or
not); lazy quantifiers read as greedy ones, which match the same set of strings. Look-arounds,
anchors and back-references have no automaton and raise GrammarError.
"""

from __future__ import annotations

import functools
import re

from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.regex_syntax import (
    ALL_CODEPOINTS,
    REPEAT_OPS,
    Ranges,
    case_variants,
    class_item_ranges,
    complement_ranges,
    encodable_ranges,
    normalise_ranges,
    sre_constants,
    sre_parse,
)

MAX_NFA_STATES = 200_000  # past this the DFA would take too long to build; the grammar is refused


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


class NFA:
    """A Thompson NFA over byte ranges: per state, its byte edges and its epsilon moves."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int, int]]] = []  # state -> [(byte lo, byte hi, target)]
        self.eps: list[list[int]] = []
        self.has_empty_set = False  # a character set with no encodable character: some states may not reach the end

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise GrammarError(f"a terminal's automaton needs more than {MAX_NFA_STATES} states; use smaller repetition bounds")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def charset(self, ranges: Ranges) -> tuple[int, int]:
        start, end = self.state(), self.state()
        sequences = _charset_sequences(tuple(ranges))
        self.has_empty_set |= not sequences
        for seq in sequences:
            cur = start
            for k, (a, b) in enumerate(seq):
                nxt = end if k == len(seq) - 1 else self.state()
                self.edges[cur].append((a, b, nxt))
                cur = nxt
        return start, end


@functools.lru_cache(maxsize=4096)
def _charset_sequences(ranges: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """A character set's UTF-8 byte-range sequences (the same sets recur in every JSON schema)."""
    return tuple(tuple(seq) for lo, hi in normalise_ranges(list(ranges)) for seq in _utf8_sequences(lo, hi))


def _build(nfa: NFA, items: list, flags: int, where: str) -> tuple[int, int]:
    """A parsed regex (sre's list of (op, arg)) -> (start, end) NFA fragment."""
    start = cur = nfa.state()
    for op, av in items:
        s, e = _build_one(nfa, op, av, flags, where)
        nfa.eps[cur].append(s)
        cur = e
    return start, cur


def _build_one(nfa: NFA, op: object, av: object, flags: int, where: str) -> tuple[int, int]:
    icase = bool(flags & re.IGNORECASE)
    if op in (sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.IN, sre_constants.ANY):
        if op is sre_constants.ANY:
            ranges = list(ALL_CODEPOINTS) if flags & re.DOTALL else complement_ranges([(10, 10)])
        elif op is sre_constants.IN:
            items = list(av)  # type: ignore[call-overload]
            negate = bool(items) and items[0][0] is sre_constants.NEGATE
            ranges = normalise_ranges([r for o, a in items[negate:] for r in class_item_ranges(o, a, flags, where)])
            if icase:
                ranges = case_variants(ranges)
            if negate:
                ranges = complement_ranges(ranges)
        elif op is sre_constants.LITERAL and not icase and av < 0x80:  # the common case, without the set machinery
            start, end = nfa.state(), nfa.state()
            nfa.edges[start].append((av, av, end))  # type: ignore[arg-type]
            return start, end
        else:
            ranges = [(av, av)]  # type: ignore[list-item]
            if icase:
                ranges = case_variants(ranges)
            if op is sre_constants.NOT_LITERAL:
                ranges = complement_ranges(ranges)
        return nfa.charset(encodable_ranges(ranges))
    if op is sre_constants.SUBPATTERN:
        _group, add, remove, sub = av  # type: ignore[misc]
        return _build(nfa, sub.data, (flags | add) & ~remove, where)
    if op is sre_constants.BRANCH:
        start, end = nfa.state(), nfa.state()
        for alt in av[1]:  # type: ignore[index]
            s, e = _build(nfa, alt.data, flags, where)
            nfa.eps[start].append(s)
            nfa.eps[e].append(end)
        return start, end
    if op in REPEAT_OPS:
        lo, hi, sub = av  # type: ignore[misc]
        start = cur = nfa.state()
        for _ in range(lo):
            s, e = _build(nfa, sub.data, flags, where)
            nfa.eps[cur].append(s)
            cur = e
        if hi is sre_constants.MAXREPEAT:
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
    names = {sre_constants.AT: "anchors (^, $, \\b)", sre_constants.ASSERT: "look-aheads / look-behinds",
             sre_constants.ASSERT_NOT: "look-aheads / look-behinds", sre_constants.GROUPREF: "back-references"}  # fmt: skip
    what = names.get(op, str(op))  # type: ignore[call-overload]
    raise GrammarError(f"{where}: {what} cannot be compiled to an automaton; rewrite the terminal without them")


def build_nfa(pattern: str, where: str = "regex") -> tuple[NFA, int, int]:
    """A Python regex -> (Thompson NFA over UTF-8 byte ranges, start state, final state), which
    dfa.determinise turns into a DFA over byte classes. Raises GrammarError for syntax errors and
    constructs with no automaton (look-arounds, anchors, back-references)."""
    try:
        parsed = sre_parse.parse(pattern, 0)
    except re.error as e:
        raise GrammarError(f"{where}: invalid regex {pattern!r}: {e}") from None
    nfa = NFA()
    start, final = _build(nfa, parsed.data, parsed.state.flags, where)
    return nfa, start, final
