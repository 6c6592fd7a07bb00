"""Regex grammars on Loom's own byte DFA: exact token masks, shared by every request using a regex.

    CompiledRegex(regex, vocab)  (a DFA over byte classes + masks cached per mask class)  ->  .matcher() -> RegexGrammar

Why not outlines-core's `Index`: 0.2.14 drops the token transitions that leave a final state for a
continuation needing two or more characters through non-final states (after `1` in
`[0-9]+(\\.[0-9]+)?` the `.` is never allowed), silently narrowing the language, and its build
explodes on long counted repetitions. Here the mask is exact: a token is allowed iff its bytes lead
the DFA to a state from which acceptance is still reachable; EOS iff the state accepts.

The automaton: the regex's Thompson NFA over UTF-8 byte ranges (nfa.build_nfa) -> subset
construction over *byte classes* (dfa.determinise: bytes no edge tells apart share a column, ~20
columns instead of 256) -> the states that cannot reach acceptance collapsed into one dead state.
It is not minimised. The grammar backend builds it lazily (lazy_dfa.py: only the states that masks
and tokens reach, narrowing past MAX_DFA_STATES); built whole, past that bound it is refused.

A mask is computed once per state, lazily, by a walk of the vocabulary's byte trie in C
(token_walk.py: tens of microseconds, a dead prefix skipping its subtree). Without a C compiler,
masks are computed once per *mask class* instead (states that agree on liveness after every
string up to the longest token's length share a mask: a `maxLength: 200` string has ~800 states
but a few dozen classes), by one vectorised numpy pass of the vocabulary through the DFA.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from loom.runtime.constrained.dfa import subset_table
from loom.runtime.constrained.lazy_dfa import DEAD, UNKNOWN, SubsetDFA
from loom.runtime.constrained.matcher import TokenMatcher
from loom.runtime.constrained.regex_pieces import RegexPieces
from loom.runtime.constrained.token_walk import available as walk_available
from loom.runtime.constrained.token_walk import token_trie, trie_mask
from loom.runtime.constrained.vocabulary import TokenVocab

MAX_DFA_STATES = 50_000  # a regex whose DFA needs more is refused (memory, and masks to compute)
COMPILE_TIME_LIMIT_S = 10.0  # subset construction past this is refused, never left to hang
# A lazy DFA (every regex and JSON Schema the backend compiles) built whole within this, else state
# by state as walks reach them. 0: always lazily. The first mask reaches only a few states (4 on
# each of bench_grammar_first_token's 8 schemas), and building the rest first cost 0.5-3 ms of CPU
# before every new schema's first token; the states a generation then reaches are built as it does
# (~25-50 us each, never more of them).
EAGER_BUDGET_S = 0.0
PRECOMPUTE_TIME_S = 0.002  # masks walked at compile time, nearest states first (CompiledRegex._precompute)
MAX_FORCED_BYTES = 4096  # forced strings longer than this are cut (JSON keys are far shorter)
MASK_CACHE_BYTES = 64 << 20  # a grammar's masks past this are dropped and recomputed as visited


class CompiledRegex:
    """A regex's DFA over a vocabulary plus caches (masks per mask class, forced bytes per state),
    computed once and shared by every request's RegexGrammar.

    Raises GrammarError for invalid regexes, constructs with no automaton (look-arounds, anchors,
    back-references), regexes matching nothing, and automata past MAX_DFA_STATES or the time limit."""

    def __init__(
        self,
        regex: str,
        vocab: TokenVocab,
        *,
        max_states: int = MAX_DFA_STATES,
        time_limit_s: float = COMPILE_TIME_LIMIT_S,
        lazy: bool = False,
        pieces: RegexPieces | None = None,
    ) -> None:
        """lazy: build the DFA's states as walks reach them (lazy_dfa.py) when building it whole takes
        longer than EAGER_BUDGET_S (and the C walk is at hand); a DFA built whole then is exactly
        the eager one. Past `max_states` a lazy DFA narrows instead of growing (sound); an eager
        one is refused. pieces: `regex` with its pieces as sentinels (regex_pieces.py; read by the
        lazy build, whose NFA splices their cached fragments)."""
        self.regex = regex
        self.vocab = vocab
        self.vocab_size = vocab.vocab_size
        self.eos_token_ids = vocab.eos_token_ids
        shown = f"regex {regex[:200]!r}{'...' if len(regex) > 200 else ''}"
        self._trie = token_trie(vocab) if walk_available() else None
        self._lazy: SubsetDFA | None = None
        if lazy and self._trie is not None:
            dfa = SubsetDFA(regex, shown, max_states, pieces)
            if EAGER_BUDGET_S > 0 and dfa.explore(EAGER_BUDGET_S):
                table, byte_class, accepting = dfa.eager()
            else:
                self._lazy = dfa
                table, byte_class, accepting = dfa.table, dfa.byte_class, dfa.accepting
        else:
            table, byte_class, accepting = subset_table(regex, shown, max_states, time_limit_s)
        self._table = table  # [S + 1, C] int32; row S is the dead state (lazy: the dfa's, growing; row 1 is dead)
        self.byte_class = byte_class  # [256] int64
        self._accepting = accepting  # [S + 1] bool
        self.dead = DEAD if self._lazy is not None else table.shape[0] - 1
        self.initial_state = 0
        self._rows: list[list[int]] = [] if self._lazy is not None else table.tolist()  # for per-byte Python walks
        self._cls: list[int] = byte_class.tolist()
        self.mask_class: np.ndarray | None = None  # None: each state its own class (lazy DFAs)
        if self._trie is not None:  # a walk costs less than the classes (up to 60 ms at compile): one mask per state
            if self._lazy is None:
                self.mask_class = np.arange(table.shape[0], dtype=np.int64)  # [S + 1]
        else:
            max_len = int(vocab.lens.max()) if len(vocab.lens) else 1
            self.mask_class = _mask_classes(table, self.dead, max_len)  # [S + 1] int64
        self._first = _first_byte_rows(vocab)
        self._eos_words = vocab.pack(sorted(t for t in vocab.eos_token_ids if t < vocab.vocab_size))
        self._words: dict[int, np.ndarray] = {}  # mask class -> packed non-EOS tokens (uint32)
        self._masks: dict[tuple[int, bool], tuple[torch.Tensor, bool]] = {}
        self._forced: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.mask(self.initial_state)  # warm up on the compiling thread, not the scheduler's
        self.forced_bytes(self.initial_state)
        if self._lazy is None:
            self._precompute(PRECOMPUTE_TIME_S)

    @property
    def table(self) -> np.ndarray:
        return self._lazy.table if self._lazy is not None else self._table

    @property
    def accepting(self) -> np.ndarray:
        return self._lazy.accepting if self._lazy is not None else self._accepting

    def _class(self, state: int) -> int:
        return state if self.mask_class is None else int(self.mask_class[state])

    def _row(self, state: int) -> np.ndarray:
        """State's row [C] (built first where the DFA is lazy)."""
        if self._lazy is not None:
            self._lazy.expand(state)
        return self.table[state]

    @property
    def num_states(self) -> int:
        return self._lazy.num_states - 1 if self._lazy is not None else self.dead

    @property
    def nbytes(self) -> int:
        """What this compiled regex holds: its tables and the masks computed so far."""
        mask_bytes = self._eos_words.nbytes
        return self.table.nbytes * 3 + (len(self._words) + len(self._masks)) * mask_bytes

    def matcher(self) -> RegexGrammar:
        return RegexGrammar(self)

    def is_final(self, state: int) -> bool:
        return bool(self.accepting[state])

    def next_state(self, state: int, token_id: int) -> int | None:
        """The state after the token's bytes, or None when they lead nowhere (or it has no bytes)."""
        data = self.vocab.by_id.get(token_id)
        if data is None:
            return None
        cls, dead = self._cls, self.dead
        lazy = self._lazy
        if lazy is not None:  # a row not built yet is all UNKNOWN (after a mask, every row a token reads is built)
            for b in data:
                nxt = int(lazy.table[state, cls[b]])
                if nxt == UNKNOWN:
                    lazy.expand(state)
                    nxt = int(lazy.table[state, cls[b]])
                if nxt == dead:
                    return None
                state = nxt
            return state
        rows = self._rows
        for b in data:
            state = rows[state][cls[b]]
            if state == dead:
                return None
        return state

    def mask(self, state: int) -> tuple[torch.Tensor, bool]:
        """-> (packed mask [ceil(V / 32)] int32, whether any non-EOS token is allowed)."""
        key = (self._class(state), bool(self.accepting[state]))
        entry = self._masks.get(key)
        if entry is None:
            if (len(self._words) + len(self._masks)) * self._eos_words.nbytes > MASK_CACHE_BYTES:
                with self._lock:  # bounded: the masks of states not visited lately are recomputed on demand
                    self._words.clear()
                    self._masks.clear()
            words = self._words.get(key[0])
            if words is None:
                words = self._words[key[0]] = self._scan(state)
            more = bool(words.any())
            if key[1]:
                words = words | self._eos_words
            entry = (torch.from_numpy(words.view(np.int32)), more)
            with self._lock:
                self._masks[key] = entry
        return entry

    def _precompute(self, budget_s: float) -> None:
        """Scan the mask classes of the states reachable from the initial one, breadth first, until
        `budget_s` runs out (on the compiling thread): a first visit to a state otherwise scans the
        vocabulary while the scheduler waits (up to tens of ms at 128k tokens). The rest stay lazy."""
        deadline = time.monotonic() + budget_s
        seen = np.zeros(self.table.shape[0], dtype=bool)
        seen[self.dead] = seen[self.initial_state] = True
        frontier = np.array([self.initial_state])
        while len(frontier):
            for state in frontier.tolist():
                if time.monotonic() > deadline:
                    return
                key = self._class(state)
                if key not in self._words:
                    self._words[key] = self._scan(state)
            nxt = np.unique(self.table[frontier].ravel())
            frontier = nxt[~seen[nxt]]
            seen[frontier] = True

    def _scan(self, state: int) -> np.ndarray:
        """Packed words [ceil(V / 32)] uint32 of the tokens whose bytes keep `state` alive: a walk of
        the vocabulary's trie (token_walk.py), else `_scan_numpy`."""
        if self._trie is not None:
            words = trie_mask(self._trie, self.table, self.byte_class, self.dead, state, self._lazy)
            if words is not None:
                return words
        return self._scan_numpy(state)

    def _scan_numpy(self, state: int) -> np.ndarray:
        """`_scan` as one pass over the vocabulary matrix, byte position by byte position, from the
        tokens whose first byte is live; tokens leave the pass when they end (allowed) or die."""
        v, table, bc, dead = self.vocab, self.table, self.byte_class, self.dead
        row = table[state][bc]  # [256] next state per byte
        live_first = np.flatnonzero(row != dead)
        parts = [self._first[b] for b in live_first.tolist() if len(self._first[b])]
        if not parts:
            return v.pack([])
        idx = np.concatenate(parts)  # [n] rows of v.data
        st = row[v.data[idx, 0]]  # [n] states after the first byte, all live
        allowed: list[np.ndarray] = []
        j = 1
        while len(idx):
            done = v.lens[idx] == j
            if done.any():
                allowed.append(idx[done])
                idx, st = idx[~done], st[~done]
                if not len(idx):
                    break
            st = table[st, bc[v.data[idx, j]]]
            live = st != dead
            idx, st = idx[live], st[live]
            j += 1
        return v.pack(v.ids[np.concatenate(allowed)] if allowed else [])

    def forced_bytes(self, state: int) -> bytes:
        """The longest byte string every accepted continuation from `state` starts with: follow the
        states with exactly one live byte, stopping at an accepting one (EOS may end the text there).
        b"" when none. Cached per state."""
        forced = self._forced.get(state)
        if forced is None:
            out, q, dead = bytearray(), state, self.dead
            while not self.accepting[q] and len(out) < MAX_FORCED_BYTES:
                row = self._row(q)
                live = np.flatnonzero(row[self.byte_class] != dead)
                if len(live) != 1:
                    break
                b = int(live[0])
                out.append(b)
                q = int(row[self._cls[b]])
            forced = bytes(out)
            with self._lock:
                self._forced[state] = forced
        return forced


class RegexGrammar(TokenMatcher):
    """One request's position in a compiled regex (the matcher of matcher.TokenMatcher; forced_bytes
    is b"" at a final state)."""

    compiled: CompiledRegex

    def __init__(self, compiled: CompiledRegex) -> None:
        super().__init__(compiled, compiled.initial_state, compiled.eos_token_ids)

    def _next(self, state: int, token_id: int) -> int | None:
        return self.compiled.next_state(state, token_id)

    def _can_end(self, state: int) -> bool:
        return self.compiled.is_final(state)


def _mask_classes(table: np.ndarray, dead: int, depth: int) -> np.ndarray:
    """[S + 1] class ids: states in one class are dead or alive alike after every string of at most
    `depth` bytes, so no token of at most `depth` bytes tells them apart (Moore refinement, `depth`
    rounds at most, from {live, dead})."""
    cls = (np.arange(table.shape[0]) == dead).astype(np.int64)
    weights = np.random.default_rng(0).integers(1, 2**63, size=table.shape[1] + 1, dtype=np.uint64) | np.uint64(1)
    count = 2
    for _ in range(depth):
        sig = np.concatenate([cls[:, None], cls[table]], axis=1)  # [S + 1, C + 1]
        # Rows -> one 64-bit hash (np.unique on rows sorts them, ~100x slower), checked exactly
        # below: every state must have its class representative's row.
        with np.errstate(over="ignore"):
            key = (sig.astype(np.uint64) * weights).sum(axis=1)
        _, first, refined = np.unique(key, return_index=True, return_inverse=True)
        refined = refined.reshape(-1)
        if not (sig == sig[first[refined]]).all():  # a hash collision: sort the rows themselves
            _, refined = np.unique(sig, axis=0, return_inverse=True)
            refined = refined.reshape(-1)
        new_count = int(refined.max()) + 1
        cls = refined
        if new_count == count:
            break
        count = new_count
    return cls


_FIRST_ROWS: dict[int, tuple[TokenVocab, list[np.ndarray]]] = {}
_FIRST_LOCK = threading.Lock()


def _first_byte_rows(vocab: TokenVocab) -> list[np.ndarray]:
    """Per first byte, the rows of vocab.data starting with it (once per vocabulary; TokenVocab is
    frozen and slotted, so the index lives here, keyed by identity, holding the vocabulary)."""
    with _FIRST_LOCK:
        hit = _FIRST_ROWS.get(id(vocab))
        if hit is None or hit[0] is not vocab:
            first = vocab.data[:, 0] if len(vocab.ids) else np.zeros(0, dtype=np.uint8)
            by = np.argsort(first, kind="stable")
            starts = np.searchsorted(first[by], np.arange(257))
            while len(_FIRST_ROWS) >= 4:  # a few vocabularies at most (one per backend); keep the newest
                del _FIRST_ROWS[next(iter(_FIRST_ROWS))]
            hit = _FIRST_ROWS[id(vocab)] = (vocab, [by[starts[b] : starts[b + 1]] for b in range(256)])
        return hit[1]
