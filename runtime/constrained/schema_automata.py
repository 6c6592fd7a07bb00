"""Automata the JSON-Schema grammar builds directly rather than from a regex: counted strings (a
chain of one character's automaton), and products of two automata (a pattern beside lengths, keys
matching a pattern and no declared name).

    counted_string_dfa(lo, hi, open_quote, close_quote) -> ByteDFA   `"?` + lo..hi characters + `"?`
    product(a, b, keep_b) -> ByteDFA                                   L(a) & L(b), or L(a) - L(b)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from loom.runtime.constrained.dfa import ByteDFA, co_reachable, minimal_dfa, terminal_dfa
from loom.runtime.constrained.errors import GrammarError

STRING_CHAR = r'(?:[^"\\\x00-\x1f]|\\["\\\x2fbfnrt]|\\u[0-9a-fA-F]{4})'  # one character of a JSON string, as its text
MAX_PRODUCT_STATES = 20_000  # an intersection automaton past this is refused (built in Python: ~1 s per 10k states)


@dataclass(frozen=True, slots=True)
class CountedShape:
    """What a counted string's automaton says about its states (counted_scan reads it): `copy[q]`
    characters read at a state q between characters (past the opening quote), -1 at any other;
    lo..hi characters (hi None: no maximum), then a closing quote (close) or the lexeme's end."""

    lo: int
    hi: int | None
    close: bool
    copy: np.ndarray  # [S + 1] int32


@functools.lru_cache(maxsize=256)
def counted_string_dfa(lo: int, hi: int | None, open_quote: bool, close_quote: bool) -> ByteDFA:
    """The minimal DFA of `"?` + lo..hi JSON string characters + `"?` (either quote as asked), built
    as a chain of copies of one character's automaton: a character is prefix-free (its accepting
    state has no move) and never starts with a quote, so after each one the next copy starts, and
    no subset construction is needed. terminal_dfa on the same regex gives the same automaton, in
    ~200 ms for 64 characters (subset construction over an unrolled NFA); this takes ~1 ms."""
    unit = terminal_dfa(STRING_CHAR, "a JSON string character")
    u_dead = unit.dead
    done = np.flatnonzero(unit.accepting)
    assert len(done) == 1 and (unit.table[done[0]] == u_dead).all() and unit.table[0, ord('"')] == u_dead
    inner = [q for q in range(u_dead) if q != done[0]]  # start (0) first
    m = len(inner)
    pos = np.full(u_dead + 1, -1, dtype=np.int64)
    pos[inner] = np.arange(m)
    top = hi if hi is not None else lo  # copies 0..top; unbounded: the last loops
    first = 1 if open_quote else 0
    n_p = (top + 1) * m
    final = first + n_p  # (close_quote) after the closing quote
    dead = final + (1 if close_quote else 0)
    table = np.full((dead + 1, 256), dead, dtype=np.int64)
    accepting = np.zeros(dead + 1, dtype=bool)
    if open_quote:
        table[0, ord('"')] = first
    step = unit.table[inner]  # [m, 256] the character's moves from each inner state
    for i in range(top + 1):
        base = first + i * m
        nxt_char = i + 1 if i < top else (top if hi is None else -1)  # the copy a completed character leads to
        rows = np.where(step == u_dead, dead, base + pos[np.minimum(step, u_dead)])
        done_to = dead if nxt_char < 0 else first + nxt_char * m  # (its start)
        rows = np.where(step == done[0], done_to, rows)
        table[base : base + m] = rows
        if hi is None and i == top and top:  # the loop: a character started here is one started a copy before
            table[base] = table[base - m]  # (whose inner states complete into this copy), so they are shared
        if i >= lo:
            if close_quote:
                table[base, ord('"')] = final
            else:
                accepting[base] = True
    if close_quote:
        accepting[final] = True
    live = co_reachable(table[:dead], accepting[:dead])
    seen = np.zeros(dead + 1, dtype=bool)  # reached from the start (the loop's own inner states are not)
    todo = [0]
    seen[0] = True
    while todo:
        nxt = np.unique(table[todo])
        nxt = nxt[~seen[nxt]]
        seen[nxt] = True
        todo = nxt.tolist()
    keep = np.append(live, False) & seen
    new_of = np.where(keep, np.cumsum(keep) - 1, int(keep.sum()))
    out = new_of[table[keep]]
    copy = np.full(dead + 1, -1, dtype=np.int32)  # characters read, at the states between characters
    copy[first + np.arange(top + 1) * m] = np.arange(top + 1)
    shape = CountedShape(lo, hi, close_quote, np.append(copy[keep], np.int32(-1)))
    table = np.ascontiguousarray(np.vstack([out, np.full((1, 256), keep.sum())]), dtype=np.int32)
    return ByteDFA(table, np.append(accepting[keep], False), shape)


def product(a: ByteDFA, b: ByteDFA, keep_b: bool) -> ByteDFA:
    """The minimal automaton of L(a) & L(b) (keep_b) or L(a) - L(b) (not keep_b); refused past
    MAX_PRODUCT_STATES states. Built breadth first a layer at a time: a pair is numbered where it
    first appears (its row's states in order, then its key p * |b| + q ascending)."""
    nb = b.table.shape[0]
    known, known_ids = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)  # pair keys (sorted), their ids
    rows = []
    frontier = np.zeros(1, dtype=np.int64)  # the keys of the states whose rows come next (ids in order)
    n = 1
    while len(frontier):
        p, q = np.divmod(frontier, nb)
        keys = a.table[p].astype(np.int64) * nb + b.table[q]  # [F, 256]
        ranked = np.sort(keys, axis=1)
        first = np.ones(ranked.shape, dtype=bool)
        first[:, 1:] = ranked[:, 1:] != ranked[:, :-1]
        met = ranked[first]  # each row's keys once, rows in order
        at = np.minimum(np.searchsorted(known, met), len(known) - 1)
        met = met[known[at] != met]
        uniq, where = np.unique(met, return_index=True)
        frontier = uniq[np.argsort(where)]  # new pairs, as first met
        order = np.argsort(np.concatenate([known, frontier]), kind="stable")
        known = np.concatenate([known, frontier])[order]
        known_ids = np.concatenate([known_ids, np.arange(n, n + len(frontier))])[order]
        n += len(frontier)
        if n > MAX_PRODUCT_STATES:
            raise GrammarError("json_schema: a key or string automaton (patternProperties, pattern beside lengths) is too large")
        rows.append(known_ids[np.searchsorted(known, keys)])
    table = np.concatenate(rows)
    pairs = np.empty(n, dtype=np.int64)
    pairs[known_ids] = known
    accepting = a.accepting[pairs // nb] & (b.accepting[pairs % nb] == keep_b)
    live = accepting.copy()
    while True:
        grown = live | live[table].any(axis=1)
        if (grown == live).all():
            break
        live = grown
    if not live[0]:
        return ByteDFA(np.zeros((1, 256), dtype=np.int32), np.zeros(1, dtype=bool))
    keep = np.flatnonzero(live)  # start (0) first
    new_of = np.full(n, len(keep), dtype=np.int64)
    new_of[keep] = np.arange(len(keep))
    full = np.vstack([new_of[table[keep]], np.full((1, 256), len(keep), dtype=np.int64)])
    _, first, byte_class = np.unique(full.T, axis=0, return_index=True, return_inverse=True)
    return minimal_dfa(full[:, first], np.append(accepting[keep], False), byte_class.reshape(-1))


def empty(dfa: ByteDFA) -> bool:
    return dfa.dead == 0
