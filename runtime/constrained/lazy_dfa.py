"""Subset construction on demand: the DFA states a walk reaches, and no others.

    dfa = SubsetDFA(regex, shown)         the NFA, its byte classes and the start state (cheap)
    dfa.explore(budget_s) -> bool          expand states breadth first; True when every state is built
    dfa.expand(q)                          build state q's row (its successors get rows of UNKNOWN)
    dfa.build_in_place(walk)               a C walk (token_walk's) builds the rows it reaches with the C step itself
    dfa.eager() -> (table, byte_class, accepting)   once complete: dfa.determinise's layout (start 0, dead last)

A schema with a counted string or two `date-time` formats has a DFA of thousands of states whose
construction in Python took 30-150 ms before the first token; a generation visits a few dozen of
them. Here the table grows as masks and tokens reach states (regex_dfa.CompiledRegex expands the
state a walk of the token trie stops at, and resumes the walk).

Liveness without the whole DFA: a subset keeps only NFA states from which the NFA's final state
is reachable (computed on the NFA, linearly), so the empty subset is the one dead state and every
other subset can still reach acceptance: the masks are exact, as with the trimmed eager DFA.

Lazy layout: state 0 starts, state 1 is dead (its row points to itself), rows not built yet hold
UNKNOWN. Past `max_states` states, new subsets are taken as dead: the language narrows (sound, no
invalid text is ever allowed) instead of memory growing without bound.

The subset step runs in C where a compiler is at hand (subset_native.py: ~4 us a state, where
this module's Python step takes ~20-50 us); both number the states alike and build the same table.
`native=False` (or LOOM_NO_C_SUBSET=1) keeps the Python step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.nfa import build_nfa
from loom.runtime.constrained.regex_pieces import RegexPieces
from loom.runtime.constrained.subset_native import NativeSubsets
from loom.runtime.constrained.subset_native import available as native_available

UNKNOWN = -1
START, DEAD = 0, 1


class SubsetDFA:
    def __init__(self, regex: str, shown: str, max_states: int, pieces: RegexPieces | None = None, native: bool | None = None) -> None:
        """pieces: `regex` with its pieces as sentinels (regex_pieces.py), whose cached NFA fragments
        are spliced in; the automaton is the same. native: the C subset step (None: where compiled)."""
        try:
            # lazy: spliced states (counted repetitions' copies, pieces) are filled in as subsets reach them
            nfa, start, final = build_nfa(pieces.regex if pieces else regex, pieces=pieces.texts if pieces else None, lazy=True)
        except GrammarError as e:  # "regex: invalid regex '...': why" -> "regex '...' cannot be compiled: why"
            why = str(e).removeprefix("regex: ").replace(f"invalid regex {regex!r}: ", "")
            raise GrammarError(f"{shown} cannot be compiled: {why}") from None
        use_native = native_available() if native is None else native
        # co-reachable NFA states: the final one, and every state with an edge (byte or epsilon) into
        # one. In a Thompson NFA without an empty character set, that is every state (None: all).
        live = None if use_native else [True] * len(nfa.edges)
        if nfa.has_empty_set:
            nfa.fill_all()
            back: list[list[int]] = [[] for _ in nfa.edges]
            for s, (edges, eps) in enumerate(zip(nfa.edges, nfa.eps)):
                for _, _, t in edges:
                    back[t].append(s)
                for t in eps:
                    back[t].append(s)
            live = [False] * len(nfa.edges)
            live[final] = True
            todo = [final]
            while todo:
                for s in back[todo.pop()]:
                    if not live[s]:
                        live[s] = True
                        todo.append(s)
        self._native: NativeSubsets | None = None
        if use_native:  # the C step; it finds the byte classes too
            self._native = NativeSubsets(nfa, start, final, live, max_states)
            self.byte_class, self.n_cls = self._native.byte_class, self._native.n_cls
        else:
            cuts = {0, 256} | nfa.cuts
            for edges in nfa.edges:
                for a, b, _ in edges or ():
                    cuts.update((a, b + 1))
            bounds = sorted(cuts)
            self.byte_class = np.zeros(256, dtype=np.int64)
            for k, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
                self.byte_class[lo:hi] = k
            self.n_cls = len(bounds) - 1
        self.max_states = max_states
        self.table = np.full((64, self.n_cls), UNKNOWN, dtype=np.int32)  # [capacity, C]
        self.table[DEAD] = DEAD
        self.accepting = np.zeros(64, dtype=bool)
        self.expanded = np.zeros(64, dtype=bool)
        self.expanded[DEAD] = True
        self._next = START  # states before it are built (explore's breadth-first order is the numbering)
        if self._native is not None:
            if not self._native.start_size():
                raise GrammarError(f"{shown} matches nothing", ErrorKind.EMPTY)
            self._n = 2
            self.accepting[START] = self._native.accepts(START)
            self._lock = threading.Lock()  # growing the arrays and the C step, as one
            self._pointers = (self.table.ctypes.data, self.accepting.ctypes.data, self.expanded.ctypes.data)
            return
        self._live = live
        self._edges = nfa.edges
        self._cls = self.byte_class.tolist()
        self._moves: list[list[tuple[int, int]] | None] = [None] * len(nfa.edges)  # per NFA state, built on first use
        self._eps = nfa.eps
        self._fill = nfa.fill
        self._final = final
        self._closures: dict[frozenset[int], frozenset[int]] = {}
        first = self._closure(frozenset({start}))
        if not first:
            raise GrammarError(f"{shown} matches nothing", ErrorKind.EMPTY)
        self._subsets: list[frozenset[int]] = [first, frozenset()]
        self._index: dict[frozenset[int], int] = {first: START, frozenset(): DEAD}
        self.accepting[START] = final in first

    @property
    def num_states(self) -> int:
        return self._n if self._native is not None else len(self._subsets)

    def _grow(self, need: int) -> None:
        """Room for `need` states in the table and flags (doubling)."""
        grow = self.table.shape[0]
        while grow + self.table.shape[0] < need:
            grow *= 2
        self.table = np.vstack([self.table, np.full((grow, self.n_cls), UNKNOWN, dtype=np.int32)])
        self.accepting = np.concatenate([self.accepting, np.zeros(grow, dtype=bool)])
        self.expanded = np.concatenate([self.expanded, np.zeros(grow, dtype=bool)])

    def _closure(self, seeds: frozenset[int]) -> frozenset[int]:
        out = self._closures.get(seeds)
        if out is None:
            todo, seen, eps, fill = list(seeds), set(seeds), self._eps, self._fill
            while todo:
                u = todo.pop()
                for t in eps[u] or fill(u):
                    if t not in seen:
                        seen.add(t)
                        todo.append(t)
            # a subset only needs the states that read a byte, plus the final one (fewer, more shared keys)
            edges, live, final = self._edges, self._live, self._final
            out = self._closures[seeds] = frozenset(s for s in seen if (edges[s] or s == final) and live[s])
        return out

    def _state(self, subset: frozenset[int]) -> int:
        q = self._index.get(subset)
        if q is None:
            if len(self._subsets) >= self.max_states:
                return DEAD  # past the bound: narrower, never wrong
            q = self._index[subset] = len(self._subsets)
            self._subsets.append(subset)
            if q >= self.table.shape[0]:
                self._grow(q + 1)
            self.accepting[q] = self._final in subset
        return q

    def expand(self, q: int) -> None:
        """Build state q's row (a no-op when it is built)."""
        if self.expanded[q]:
            return
        if self._native is not None:
            with self._lock:
                if self._n + self.n_cls > self.table.shape[0]:  # the step adds at most one state per class
                    self._grow(self._n + self.n_cls)
                    self._pointers = (self.table.ctypes.data, self.accepting.ctypes.data, self.expanded.ctypes.data)
                self._n = self._native.expand(q, *self._pointers)
            return
        targets: list[list[int]] = [[] for _ in range(self.n_cls)]
        moves = self._moves
        for s in self._subsets[q]:
            m = moves[s]
            if m is None:
                cls, live = self._cls, self._live
                m = moves[s] = [(c, t) for a, b, t in self._edges[s] if live[t] for c in range(cls[a], cls[b] + 1)]
            for c, t in m:
                targets[c].append(t)
        row = [self._state(self._closure(frozenset(ts))) if ts else DEAD for ts in targets]
        self.table[q] = row  # after _state: the table may have grown meanwhile
        self.expanded[q] = True

    def builds_in_c(self) -> bool:
        """Whether rows are built by the C step (and so `build_in_place` may be used)."""
        return self._native is not None

    def build_in_place(self, walk: Callable[[int, tuple[int, ...]], int]) -> None:
        """Run a C walk that builds the rows it reaches with the C step itself (token_walk's trie
        walk: a round trip through Python per row cost ~10 us, dozens a mask in a counted string):
        walk(table address, (step, builder, accepting, expanded, address of the state count, capacity))
        returns -1 when done, a state it lacked room to build (the arrays grow and it is called
        again), or -2 when the step failed. Under the lock, as `expand`'s step and growth are."""
        assert self._native is not None, "only the C step builds in place"
        count = np.zeros(1, dtype=np.int64)
        with self._lock:
            while True:
                count[0] = self._n
                table, accepting, expanded = self._pointers
                answer = walk(table, (*self._native.step_in_c, accepting, expanded, count.ctypes.data, self.table.shape[0]))
                self._n = int(count[0])
                if answer == -1:
                    return
                if answer < -1:
                    raise MemoryError("the lazy DFA's subset builder ran out of memory")
                self._grow(self._n + self.n_cls)  # (at least doubled: the walk then has room for the row it lacked)
                self._pointers = (self.table.ctypes.data, self.accepting.ctypes.data, self.expanded.ctypes.data)

    def explore(self, budget_s: float) -> bool:
        """Expand states breadth first until every state is built (True) or the budget is spent."""
        deadline = time.monotonic() + budget_s
        i = self._next
        while i < self.num_states:
            if i % 16 == 0 and time.monotonic() > deadline:
                self._next = i
                return False
            self.expand(i)
            i += 1
        self._next = i
        return self.num_states < self.max_states

    def eager(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(table [S + 1, C] int32, byte -> class [256], accepting [S + 1]) in dfa.determinise's
        layout (start 0, live states, dead last), once `explore` returned True."""
        n = self.num_states
        order = np.array([0, *range(2, n), 1])  # new position -> old id
        new_of = np.empty(n, dtype=np.int64)
        new_of[order] = np.arange(n)
        table = new_of[self.table[:n][order]].astype(np.int32)
        return np.ascontiguousarray(table), self.byte_class, self.accepting[:n][order].copy()
