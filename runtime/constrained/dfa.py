"""Regexes as byte DFAs: subset construction over byte classes, and Moore minimisation.

    determinise(regex, shown, max_states, time_limit_s) -> (table [S + 1, C] over byte classes,
                                                            byte -> class [256], accepting [S + 1])
    terminal_dfa(pattern, where) -> ByteDFA(table [S + 1, 256] int32, accepting [S + 1] bool), minimal

The NFA is nfa.build_nfa's. Subset construction runs over *byte classes* (bytes no edge tells
apart share a column, ~20 columns instead of 256) and keeps the live states only (those that can
reach acceptance), the rest collapsed into one dead state, the last. regex_dfa.py masks over the
unminimised table (it shares masks by mask class instead); an EBNF grammar's terminals and the
JSON-Schema grammar's key automata are minimised (terminal_dfa, minimal_dfa).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lazy_dfa import SubsetDFA
from loom.runtime.constrained.nfa import build_nfa
from loom.runtime.constrained.subset_native import available as native_subsets_available
from loom.runtime.constrained.subset_native import moore

if TYPE_CHECKING:
    from loom.runtime.constrained.schema_automata import CountedShape


@dataclass(frozen=True, slots=True)
class ByteDFA:
    """A minimal DFA over bytes. State 0 starts; state `dead` (the last row) never accepts."""

    table: np.ndarray  # [S + 1, 256] int32
    accepting: np.ndarray  # [S + 1] bool
    counted: CountedShape | None = None  # a counted string's automaton (schema_automata): its states' character counts
    string_states: dict[int, bool] = field(default_factory=dict, compare=False, repr=False)  # counted_scan.string_contents
    safe_runs: dict[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict, compare=False, repr=False)  # (state,
    # depth) -> ebnf_scan.safe_runs' answer, kept with the automaton (every grammar holding it reads it)
    derived: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # what the EBNF engine derives from it once
    # (its lexer rows, whether it restarts, its staying bytes), kept likewise

    @property
    def dead(self) -> int:
        return self.table.shape[0] - 1

    def matches(self, data: bytes) -> bool:
        q = 0
        for b in data:
            q = int(self.table[q, b])
        return bool(self.accepting[q])


def determinise(regex: str, shown: str, max_states: int, time_limit_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """regex -> (table [S + 1, C] int32 over byte classes, byte -> class [256], accepting [S + 1]),
    live states only, start 0, dead last."""
    try:
        nfa, start, final = build_nfa(regex)
    except GrammarError as e:  # "regex: invalid regex '...': why" -> "regex '...' cannot be compiled: why"
        why = str(e).removeprefix("regex: ").replace(f"invalid regex {regex!r}: ", "")
        raise GrammarError(f"{shown} cannot be compiled: {why}") from None
    cuts = {0, 256}
    for edges in nfa.edges:
        for a, b, _ in edges:
            cuts.update((a, b + 1))
    bounds = sorted(cuts)
    byte_class = np.zeros(256, dtype=np.int64)
    for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        byte_class[lo:hi] = k
    n_cls = len(bounds) - 1
    moves: list[list[tuple[int, int]]] = [
        [(c, t) for a, b, t in edges for c in range(int(byte_class[a]), int(byte_class[b]) + 1)] for edges in nfa.edges
    ]
    # A subset only needs the states that read a byte, plus the final one: fewer, and more shared, keys.
    keep = [bool(m) or s == final for s, m in enumerate(moves)]
    closures: dict[frozenset[int], frozenset[int]] = {}

    def closure(seeds: frozenset[int]) -> frozenset[int]:
        out = closures.get(seeds)
        if out is None:
            todo, seen = list(seeds), set(seeds)
            while todo:
                for t in nfa.eps[todo.pop()]:
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            out = closures[seeds] = frozenset(s for s in seen if keep[s])
        return out

    first = closure(frozenset({start}))
    index = {first: 0}
    order = [first]
    rows: list[list[int]] = []
    deadline = time.monotonic() + time_limit_s
    while len(rows) < len(order):
        if len(order) > max_states:
            raise GrammarError(f"{shown} needs more than {max_states} automaton states; use smaller repetition bounds")
        if len(rows) % 64 == 0 and time.monotonic() > deadline:
            raise GrammarError(f"{shown} takes longer than {time_limit_s:.0f} s to compile; use smaller repetition bounds")
        targets: list[list[int]] = [[] for _ in range(n_cls)]
        for s in order[len(rows)]:
            for c, t in moves[s]:
                targets[c].append(t)
        row = [-1] * n_cls
        for c, ts in enumerate(targets):
            if ts:
                nxt = closure(frozenset(ts))
                q = index.get(nxt)
                if q is None:
                    q = index[nxt] = len(order)
                    order.append(nxt)
                row[c] = q
        rows.append(row)
    n = len(order)
    table = np.array(rows, dtype=np.int64).reshape(n, n_cls)
    table[table < 0] = n  # a sink for "no move"
    accepting = np.array([final in s for s in order] + [False], dtype=bool)
    live = co_reachable(table, accepting[:n])
    if not live[0]:
        raise GrammarError(f"{shown} matches nothing", ErrorKind.EMPTY)
    new_of = np.cumsum(live) - 1  # live states keep their order (start stays 0)
    dead = int(live.sum())
    remap = np.append(np.where(live, new_of, dead), dead)  # [n + 1]
    out = np.full((dead + 1, n_cls), dead, dtype=np.int32)
    out[:dead] = remap[table[live]]
    acc = np.zeros(dead + 1, dtype=bool)
    acc[:dead] = accepting[:n][live]
    return out, byte_class, acc


def co_reachable(table: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """[n] bool: states from which an accepting state is reachable (table [n, C], n = no move)."""
    n, n_cls = table.shape
    src = np.repeat(np.arange(n), n_cls)
    dst = table.reshape(-1)
    has = dst < n
    src, dst = src[has], dst[has]
    by_dst = np.argsort(dst, kind="stable")
    src = src[by_dst]
    starts = np.searchsorted(dst[by_dst], np.arange(n + 1))
    live = accepting.copy()
    todo = np.flatnonzero(accepting).tolist()
    while todo:
        q = todo.pop()
        for p in src[starts[q] : starts[q + 1]].tolist():
            if not live[p]:
                live[p] = True
                todo.append(p)
    return live


TERMINAL_CACHE_BYTES = 64 << 20  # terminal automata kept for reuse across grammars (LRU by bytes)
_terminals: OrderedDict[tuple[str, str], ByteDFA] = OrderedDict()
_terminals_bytes = 0
_terminals_lock = threading.Lock()


def subset_table(regex: str, shown: str, max_states: int, time_limit_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """determinise's answer (the same subsets), stepped in C where it is compiled (subset_native.py:
    a date-time regex's 1,691 states over Unicode `\\d`s took ~120 ms in Python, ~15 in C). Refused
    as determinise refuses: past `max_states` states or `time_limit_s`."""
    if not native_subsets_available():
        return determinise(regex, shown, max_states, time_limit_s)
    subsets = SubsetDFA(regex, shown, max_states, native=True)
    if not subsets.explore(time_limit_s):
        if subsets.num_states >= max_states:
            raise GrammarError(f"{shown} needs more than {max_states} automaton states; use smaller repetition bounds")
        raise GrammarError(f"{shown} takes longer than {time_limit_s:.0f} s to compile; use smaller repetition bounds")
    return subsets.eager()


def terminal_dfa(pattern: str, where: str) -> ByteDFA:
    """A regex's minimal byte DFA (cached: the least recently used past TERMINAL_CACHE_BYTES go)."""
    global _terminals_bytes
    key = (pattern, where)
    with _terminals_lock:
        hit = _terminals.get(key)
        if hit is not None:
            _terminals.move_to_end(key)
            return hit
    dfa = _terminal_dfa(pattern, where)
    with _terminals_lock:
        if key not in _terminals:
            _terminals[key] = dfa
            _terminals_bytes += dfa.table.nbytes
            while _terminals_bytes > TERMINAL_CACHE_BYTES and len(_terminals) > 1:
                _terminals_bytes -= _terminals.popitem(last=False)[1].table.nbytes
    return dfa


_SPECIAL = frozenset(".^$*+?{}[]\\|()")


def _literal(pattern: str) -> str | None:
    """The text a regex matches where it is a plain literal (every metacharacter escaped, no other
    escape: Lark's and GBNF's string terminals, `\\{`, `true`), else None."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            if i + 1 == len(pattern) or pattern[i + 1].isalnum():  # (\d, \n, \x41, \1: a class or an escape)
                return None
            c, i = pattern[i + 1], i + 1
        elif c in _SPECIAL:
            return None
        out.append(c)
        i += 1
    return "".join(out)


def _terminal_dfa(pattern: str, where: str) -> ByteDFA:
    """A regex's minimal byte DFA, built over byte classes: determinise's subset construction, then
    Moore refinement on the class columns, each signature numbered one column at a time (exact;
    the 256-column version, tests/support/reference_dfa.py, took minutes on terminals of a few thousand
    states, such as the counted strings and key sets of generated JSON-Schema grammars). A plain
    literal is a chain of states, built directly (words_dfa: ~0.04 ms where parsing the regex and
    determinising its NFA took ~0.1, and a JSON Lark grammar has nine)."""
    literal = _literal(pattern)
    if literal and not any(0xD800 <= ord(c) < 0xE000 for c in literal):  # (a lone surrogate: the regex path says what it is)
        return words_dfa([literal.encode("utf-8")])
    try:
        table, byte_class, accepting = subset_table(pattern, where, 1 << 30, float("inf"))
    except GrammarError as e:
        if e.kind is ErrorKind.EMPTY:
            return ByteDFA(np.zeros((1, 256), dtype=np.int32), np.zeros(1, dtype=bool))
        build_nfa(pattern, where)  # the NFA's own errors (syntax, look-arounds), word for word
        raise
    return minimal_dfa(table, accepting, byte_class)


def words_dfa(words: list[bytes]) -> ByteDFA:
    """The minimal DFA of a finite set of byte strings (terminal_dfa of their escaped alternation,
    without the subset construction: their trie, minimised; ~50x faster for an object's keys)."""
    used = sorted({b for w in words for b in w})
    byte_class = np.zeros(256, dtype=np.int64)  # class 0: every byte no word holds
    byte_class[used] = np.arange(1, len(used) + 1)
    rows: list[dict[int, int]] = [{}]
    ends = {0} if b"" in words else set()
    for w in words:
        q = 0
        for b in w:
            c = int(byte_class[b])
            q = rows[q].setdefault(c, len(rows))
            if q == len(rows):
                rows.append({})
        ends.add(q)
    n = len(rows)
    table = np.full((n + 1, len(used) + 1), n, dtype=np.int64)  # the last row: dead
    for q, moves in enumerate(rows):
        for c, t in moves.items():
            table[q, c] = t
    accepting = np.zeros(n + 1, dtype=bool)
    accepting[sorted(ends)] = True
    return minimal_dfa(table, accepting, byte_class)


def _moore_rounds(table: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """subset_native.moore in numpy: rounds in which a state's next class is its class and its
    successors' classes, all numbered at once, until no class splits."""
    count = len(np.unique(classes))
    while True:
        sig = np.column_stack([classes, classes[table]])  # [n, C + 1]
        order = np.lexsort(sig.T[::-1])
        ranked = sig[order]
        refined = np.empty(len(classes), dtype=np.int64)
        refined[order] = np.concatenate([[0], np.cumsum((ranked[1:] != ranked[:-1]).any(axis=1))])
        grown = int(refined.max()) + 1
        if grown == count:
            return classes
        classes, count = refined, grown


def minimal_dfa(table: np.ndarray, accepting: np.ndarray, byte_class: np.ndarray) -> ByteDFA:
    """The minimal ByteDFA of `table` [n, C] over byte classes (byte_class [256] -> column), start 0,
    whose last row is the dead sink and every other state can reach acceptance."""
    n = table.shape[0]  # the last row is the dead sink
    classes = accepting.astype(np.int64)
    classes[n - 1] = 2
    refined = moore(table, classes)  # (in C where compiled)
    classes = refined if refined is not None else _moore_rounds(table, classes)
    firsts = np.full(int(classes.max()) + 1, n, dtype=np.int64)  # each class's first state; states numbered in that order
    np.minimum.at(firsts, classes[: n - 1], np.arange(n - 1))
    firsts[classes[n - 1]] = n  # (the dead sink's class goes last)
    order = np.flatnonzero(firsts < n)
    order = order[np.argsort(firsts[order], kind="stable")]
    dead = len(order)
    rank = np.full(len(firsts), dead, dtype=np.int64)
    rank[order] = np.arange(dead)
    new_of = rank[classes]
    out = np.full((dead + 1, table.shape[1]), dead, dtype=np.int32)
    acc = np.zeros(dead + 1, dtype=bool)
    out[new_of[: n - 1]] = new_of[table[: n - 1]]
    acc[new_of[: n - 1]] = accepting[: n - 1]
    acc[dead] = False
    return ByteDFA(np.ascontiguousarray(out[:, byte_class]), acc)
