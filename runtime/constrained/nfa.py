"""Python regexes as byte-level NFAs: what dfa.py determinises (regexes, JSON schemas, an EBNF
grammar's terminals).

    build_nfa(pattern) -> (Thompson NFA over UTF-8 byte ranges, start, final)

Tokens are byte strings and may split a UTF-8 character, so the automaton reads bytes: every
character set is compiled to the UTF-8 byte sequences of its code-point ranges (as Rust's
regex-syntax does). Matching is whole-string (a lexeme either is in the terminal's language or
not); lazy quantifiers read as greedy ones, which match the same set of strings. Look-arounds,
anchors and back-references have no automaton and raise GrammarError.

Copies are spliced, not rebuilt: the copies of a counted repetition (`x{0,80}`) are copies of the
first one's states, and a regex's pieces (regex_pieces.py: formats, patterns, any JSON value...)
are fragments built once per process and kept in an LRU (`piece_fragment`), as are character sets
of many UTF-8 sequences (Unicode `\\d`, `\\w`, negated sets). A spliced fragment's
states are only reserved (None in `edges` / `eps`) and filled in from the fragment when first read
(`NFA.fill`): lazy_dfa.SubsetDFA reads only the states a walk reaches; every other reader gets
them filled (build_nfa's `lazy`).
"""

from __future__ import annotations

import bisect
import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.regex_pieces import PIECE_BASE, PIECE_END
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
# The flags as plain ints: `int & re.IGNORECASE` builds a RegexFlag enum each time (~10 us; it was a
# third of a format-heavy schema's NFA build).
_IGNORECASE, _DOTALL = int(re.IGNORECASE), int(re.DOTALL)
_DEFAULT_FLAGS = sre_parse.parse("", 0).state.flags  # a str regex's flags without inline ones
# Pieces' NFA fragments kept for reuse across regexes: the least recently used go first past this
# many NFA states in all (~170 bytes each, ~30 more once flattened for the C subset step, so ~40 MB
# at most; a date-time is ~2k states), so a stream of new patterns cannot grow memory.
PIECE_CACHE_STATES = 200_000
# A character set of more UTF-8 byte sequences than this is built once per process and spliced
# (Unicode's \d is 62 code-point ranges, ~140 NFA states, and a date-time regex holds ten).
SPLICE_SEQUENCES = 16


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
        # state -> [(byte lo, byte hi, target)] / [target]; None: a spliced state not filled in yet (fill)
        self.edges: list[list[tuple[int, int, int]] | None] = []
        self.eps: list[list[int] | None] = []
        self.has_empty_set = False  # a character set with no encodable character: some states may not reach the end
        self.pieces: Mapping[int, str] = {}  # sentinel code point -> piece regex (regex_pieces.py)
        self.cuts: set[int] = set()  # byte-class boundaries of spliced fragments (their edges may be unfilled)
        self._bases: list[int] = []  # first state of each spliced fragment, ascending
        self._frags: list[Fragment] = []

    def state(self) -> int:
        if len(self.edges) >= MAX_NFA_STATES:
            raise GrammarError(f"a terminal's automaton needs more than {MAX_NFA_STATES} states; use smaller repetition bounds")
        self.edges.append([])
        self.eps.append([])
        return len(self.edges) - 1

    def charset(self, ranges: Ranges) -> tuple[int, int]:
        key = tuple(ranges)
        sequences = _charset_sequences(key)
        if len(sequences) > SPLICE_SEQUENCES:  # built once per process, spliced (filled in as read)
            return self.splice(_cached_fragment(key, lambda: _set_fragment(sequences)))
        return self._charset(sequences)

    def _charset(self, sequences: tuple[tuple[tuple[int, int], ...], ...]) -> tuple[int, int]:
        start, end = self.state(), self.state()
        self.has_empty_set |= not sequences
        for seq in sequences:
            cur = start
            for k, (a, b) in enumerate(seq):
                nxt = end if k == len(seq) - 1 else self.state()
                self.edges[cur].append((a, b, nxt))
                cur = nxt
        return start, end

    def fragment(self, lo: int, start: int, end: int) -> Fragment:
        """States lo.. (a fragment just built, linked to nothing outside) as a Fragment (the spliced
        one itself where they are one splice, as a large character set is)."""
        if self._bases and self._bases[-1] == lo:
            frag = self._frags[-1]
            same = (len(self.edges) - lo, start - lo, end - lo) == (len(frag.edges), frag.start, frag.end)
            if same and not (self.eps[end] or self.edges[end] or frag.eps[frag.end] or frag.edges[frag.end]):
                return frag  # (an end with no moves, here and there: linked to nothing yet)
        self.fill_all(lo)
        edges = tuple(tuple((a, b, t - lo) for a, b, t in e) for e in self.edges[lo:])  # type: ignore[union-attr]
        cuts = frozenset(x for e in edges for a, b, _ in e for x in (a, b + 1))
        return Fragment(edges, tuple(tuple(t - lo for t in e) for e in self.eps[lo:]), start - lo, end - lo,  # type: ignore[union-attr]
                        self.has_empty_set, cuts)  # fmt: skip

    def splice(self, frag: Fragment) -> tuple[int, int]:
        """A copy of `frag` as new states (reserved; filled in when read) -> its (start, end). The
        end is filled now: the caller links it onwards."""
        base = len(self.edges)
        if base + len(frag.edges) > MAX_NFA_STATES:
            raise GrammarError(f"a terminal's automaton needs more than {MAX_NFA_STATES} states; use smaller repetition bounds")
        self.edges += [None] * len(frag.edges)
        self.eps += [None] * len(frag.eps)
        self._bases.append(base)
        self._frags.append(frag)
        self.has_empty_set |= frag.has_empty_set
        self.cuts |= frag.cuts
        self.fill(frag.end + base)
        return frag.start + base, frag.end + base

    @property
    def spliced(self) -> list[tuple[int, Fragment]]:
        """(first state, fragment) of every splice, in state order."""
        return list(zip(self._bases, self._frags))

    def fill(self, s: int) -> list[int]:
        """Fill in spliced state s (a no-op when it is) -> its epsilon moves."""
        eps = self.eps[s]
        if eps is None:
            k = bisect.bisect_right(self._bases, s) - 1
            base, frag = self._bases[k], self._frags[k]
            self.edges[s] = [(a, b, t + base) for a, b, t in frag.edges[s - base]]
            eps = self.eps[s] = [t + base for t in frag.eps[s - base]]
        return eps

    def fill_all(self, lo: int = 0) -> None:
        """Fill in every spliced state from lo on."""
        if self._bases and self._bases[-1] + len(self._frags[-1].edges) > lo:
            for s in range(lo, len(self.eps)):
                if self.eps[s] is None:
                    self.fill(s)


@dataclass(frozen=True, slots=True)
class Fragment:
    """NFA states numbered from 0, whose edges stay among them: spliced into an NFA at an offset."""

    edges: tuple[tuple[tuple[int, int, int], ...], ...]
    eps: tuple[tuple[int, ...], ...]
    start: int
    end: int
    has_empty_set: bool  # conservative: whether the NFA it came from had an empty set
    cuts: frozenset[int]  # its byte-class boundaries (each edge's lo and hi + 1)
    # its states as flat arrays, made once on first use (subset_native.fragment_arrays; a cached
    # piece is spliced into many NFAs)
    flat: list = field(default_factory=list, init=False, compare=False, repr=False)


_pieces: OrderedDict[Hashable, Fragment] = OrderedDict()  # (text, flags) of pieces; code-point ranges of sets
_pieces_states = 0
_pieces_lock = threading.Lock()


def _cached_fragment(key: Hashable, build: Callable[[], Fragment]) -> Fragment:
    """The fragment kept under `key`, built first where it is not: an LRU of at most
    PIECE_CACHE_STATES states in all (pieces and large character sets)."""
    global _pieces_states
    with _pieces_lock:
        hit = _pieces.get(key)
        if hit is not None:
            _pieces.move_to_end(key)
            return hit
    frag = build()
    with _pieces_lock:
        if key not in _pieces:
            _pieces[key] = frag
            _pieces_states += len(frag.edges)
            while _pieces_states > PIECE_CACHE_STATES and len(_pieces) > 1:
                _pieces_states -= len(_pieces.popitem(last=False)[1].edges)
    return frag


def piece_fragment(text: str, flags: int, where: str) -> Fragment:
    """A piece's NFA fragment (its regex read under `flags`, those in force where it stands), built
    once per process (kept as `_cached_fragment` keeps fragments)."""

    def build() -> Fragment:
        try:
            parsed = sre_parse.parse(text, 0)
        except re.error as e:
            raise GrammarError(f"{where}: invalid regex {text!r}: {e}") from None
        if parsed.state.flags != _DEFAULT_FLAGS:  # inline global flags are an error inside a larger regex
            raise GrammarError(f"{where}: invalid regex: global flags not at the start of the expression in {text[:200]!r}")
        nfa = NFA()
        start, end = _build(nfa, parsed.data, flags, where)
        return nfa.fragment(0, start, end)

    return _cached_fragment((text, flags), build)


def _set_fragment(sequences: tuple[tuple[tuple[int, int], ...], ...]) -> Fragment:
    """A character set's states (its UTF-8 sequences) as a fragment."""
    nfa = NFA()
    start, end = nfa._charset(sequences)
    return nfa.fragment(0, start, end)


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
    icase = bool(flags & _IGNORECASE)
    if op is sre_constants.LITERAL and nfa.pieces and PIECE_BASE <= av <= PIECE_END:  # type: ignore[operator]  # a piece's sentinel (regex_pieces.py)
        if av == PIECE_END:
            s = nfa.state()
            return s, s
        return nfa.splice(piece_fragment(nfa.pieces[av], flags, where))  # type: ignore[index]
    if op in (sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.IN, sre_constants.ANY):
        if op is sre_constants.ANY:
            ranges = list(ALL_CODEPOINTS) if flags & _DOTALL else complement_ranges([(10, 10)])
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
        copies = lo + (1 if hi is sre_constants.MAXREPEAT else hi - lo)
        first: list[Fragment] = []

        def copy() -> tuple[int, int]:  # the first copy is built, the others spliced (taken before it is linked)
            if first:
                return nfa.splice(first[0])
            base = len(nfa.edges)
            s, e = _build_one(nfa, *sub.data[0], flags, where) if len(sub.data) == 1 else _build(nfa, sub.data, flags, where)
            if copies > 1:
                first.append(nfa.fragment(base, s, e))
            return s, e

        start = cur = nfa.state()
        for _ in range(lo):
            s, e = copy()
            nfa.eps[cur].append(s)
            cur = e
        if hi is sre_constants.MAXREPEAT:
            s, e = copy()
            nfa.eps[cur] += [s]
            nfa.eps[e] += [s]
            end = nfa.state()
            nfa.eps[cur].append(end)
            nfa.eps[e].append(end)
            return start, end
        end = nfa.state()
        for _ in range(hi - lo):
            nfa.eps[cur].append(end)
            s, e = copy()
            nfa.eps[cur].append(s)
            cur = e
        nfa.eps[cur].append(end)
        return start, end
    names = {sre_constants.AT: "anchors (^, $, \\b)", sre_constants.ASSERT: "look-aheads / look-behinds",
             sre_constants.ASSERT_NOT: "look-aheads / look-behinds", sre_constants.GROUPREF: "back-references"}  # fmt: skip
    what = names.get(op, str(op))  # type: ignore[call-overload]
    raise GrammarError(f"{where}: {what} cannot be compiled to an automaton; rewrite the terminal without them")


def build_nfa(pattern: str, where: str = "regex", pieces: Mapping[int, str] | None = None, lazy: bool = False) -> tuple[NFA, int, int]:
    """A Python regex -> (Thompson NFA over UTF-8 byte ranges, start state, final state), which
    dfa.determinise turns into a DFA over byte classes. Raises GrammarError for syntax errors and
    constructs with no automaton (look-arounds, anchors, back-references).
    pieces: where `pattern` is a RegexPieces' regex, its texts (sentinel -> piece regex).
    lazy: spliced states are left for the reader to fill in (NFA.fill; `cuts` holds their byte
    boundaries); else every state is filled in."""
    try:
        parsed = sre_parse.parse(pattern, 0)
    except re.error as e:
        raise GrammarError(f"{where}: invalid regex {pattern!r}: {e}") from None
    nfa = NFA()
    if pieces:
        nfa.pieces = pieces
    start, final = _build(nfa, parsed.data, parsed.state.flags, where)
    if not lazy:
        nfa.fill_all()
    return nfa, start, final
