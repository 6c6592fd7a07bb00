"""The straightforward byte DFA of a regex, kept as the reference the engine's automata are tested
against: Loom's Thompson NFA (nfa.build_nfa), subset construction over all 256 bytes,
Moore minimisation. The engine builds the same automata over byte classes (dfa.determinise,
dfa.terminal_dfa), which is much faster on large terminals.

    regex_to_dfa(pattern) -> ByteDFA(table [S + 1, 256] int32, accepting [S + 1] bool); row S is dead
"""

from __future__ import annotations

import functools

import numpy as np

from loom.runtime.constrained.dfa import ByteDFA
from loom.runtime.constrained.nfa import NFA, build_nfa


def _determinise(nfa: NFA, start: int, final: int) -> tuple[np.ndarray, np.ndarray]:
    def closure(states: frozenset[int] | set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            for t in nfa.eps[todo.pop()]:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    first = closure({start})
    index = {first: 0}
    order = [first]
    rows: list[list[int]] = []
    while len(rows) < len(order):
        cur = order[len(rows)]
        targets: list[set[int]] = [set() for _ in range(256)]
        for s in cur:
            for a, b, t in nfa.edges[s]:
                for byte in range(a, b + 1):
                    targets[byte].add(t)
        row = []
        cache: dict[frozenset[int], int] = {}
        for byte in range(256):
            key = frozenset(targets[byte])
            if key not in cache:
                nxt = closure(key)
                if nxt not in index:
                    index[nxt] = len(order)
                    order.append(nxt)
                cache[key] = index[nxt]
            row.append(cache[key])
        rows.append(row)
    table = np.array(rows, dtype=np.int64)
    accepting = np.array([final in s for s in order], dtype=bool)
    return table, accepting


def _minimise(table: np.ndarray, accepting: np.ndarray) -> ByteDFA:
    """Moore refinement; states that cannot reach acceptance collapse into one dead row (last)."""
    n = table.shape[0]
    live = accepting.copy()  # reverse reachability of an accepting state
    while True:
        grown = live | live[table].any(axis=1)
        if (grown == live).all():
            break
        live = grown
    classes = np.where(live, accepting.astype(np.int64), 2)
    while True:
        sig = np.concatenate([classes[:, None], classes[table]], axis=1)  # [n, 257]
        _, refined = np.unique(sig, axis=0, return_inverse=True)
        refined = refined.reshape(-1)
        if len(np.unique(refined)) == len(np.unique(classes)):
            break
        classes = refined
    # renumber: start state first, dead (if any) last
    dead_cls = classes[~live][0] if (~live).any() else None
    order: dict[int, int] = {}
    for s in [0] + list(range(1, n)):
        c = int(classes[s])
        if c != dead_cls and c not in order:
            order[c] = len(order)
    dead = len(order)
    new_of = np.array([order.get(int(c), dead) for c in classes], dtype=np.int64)
    out = np.full((dead + 1, 256), dead, dtype=np.int32)
    acc = np.zeros(dead + 1, dtype=bool)
    for s in range(n):
        q = new_of[s]
        if q != dead:
            out[q] = new_of[table[s]]
            acc[q] = accepting[s]
    return ByteDFA(out, acc)


@functools.lru_cache(maxsize=1024)
def regex_to_dfa(pattern: str, where: str = "regex") -> ByteDFA:
    """Compile a Python regex (whole-string match) to a minimal byte DFA. `where` names the
    terminal in errors. Raises GrammarError for syntax errors and constructs with no automaton."""
    nfa, start, final = build_nfa(pattern, where)
    table, accepting = _determinise(nfa, start, final)
    return _minimise(table, accepting)
