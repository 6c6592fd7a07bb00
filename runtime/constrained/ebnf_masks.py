"""The EBNF engine's token masks (ebnf.CompiledEbnf.mask): lexer-state scans of the vocabulary, and
the walks of the few tokens that cross a lexeme end.

    masks = EbnfMasks(compiled)   once per compiled grammar; masks.mask(configs) per position

A token either stays inside the current lexeme, or ends it after j bytes and its rest starts at a
lexeme boundary at the stack after it. Per lexer state (grammar-wide, once) one walk of the
vocabulary's byte trie against the terminal's automaton (C, ebnf_scan.lexeme_scan; a vectorised
numpy pass where there is no compiler) gives the tokens that stay inside, which need no parser,
and per offset j the few that may end it after j bytes. Only those cross a lexeme end: their
remainders are walked against the parser, and each token's verdict is kept per (offset, stack
signature) where its walk read nothing of the stack but the terminals startable there (a chunk
count's stacks, or objects of one shape, share them), else per (offset, stack). What a scan's
split rows let cross at a stack is also kept by the rows' content (another lexer state's scan
often lists the same tokens), and the tokens whose remainders stay inside a lexeme startable
there (safe bytes, within its run) are not walked at all. Masks are cached per position, so a
state seen before costs one copy. A string's contents (any unbounded string's, a `maxLength`
string's chunks and tail) are scanned once per vocabulary, not per grammar (counted_scan.py), as
is any lexer state of an automaton another terminal or grammar shares (shared_scans.py), and what
such a shared row lets cross is kept per stack. A scan's dozens of split rows (a whitespace ending
at every offset) are crossed in one C call at a new stack. A mask is taken at its stacks' top frames
(ebnf_tops.py), so a deeper nesting of what was seen finds every memo filled.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

from loom.runtime.constrained.bitmask import bitmask_width, pack_ids, unpack_ids
from loom.runtime.constrained.counted_scan import counted_scan, split_tails, string_contents
from loom.runtime.constrained.ebnf_runs import restarts, split_at_run_ends, staying_bytes
from loom.runtime.constrained.ebnf_scan import available as lexeme_scan_available
from loom.runtime.constrained.ebnf_scan import lexeme_scan, safe_runs
from loom.runtime.constrained.ebnf_tops import TopFrames
from loom.runtime.constrained.ebnf_walk import CrossingWalker
from loom.runtime.constrained.ebnf_walk import available as cross_walk_available
from loom.runtime.constrained.shared_scans import keep_scan, shared_scan
from loom.runtime.constrained.token_walk import safe_mask, token_trie

if TYPE_CHECKING:
    from loom.runtime.constrained.ebnf import CompiledEbnf

_MANY = 2048  # _crossing walks more tokens than this by lexer-state scans (_accepted_after)
_FEW = 64  # _accepted_from walks this many tokens or fewer one by one
_ONE_WALK_ROWS = 8  # a scan with this many split rows, all listed, is crossed in one walk (fewer: row by row, each kept)
_CACHE_LIMIT = 200_000  # memo entries before a memo is cleared (positions are recomputed on demand)
_ONE_CALL_ROWS = 8  # a scan's plain split rows are crossed in one C call from this many (EbnfMasks._cross_rows)
MASK_CACHE_BYTES = 64 << 20  # a grammar's packed masks past this are dropped (recomputed on demand)


def _held(memo: dict[int, tuple], words: np.ndarray) -> tuple | None:
    """memo's entry for the array `words` (keyed by its identity, the entry holding it), or None."""
    held = memo.get(id(words))
    return held if held is not None and held[0] is words else None


class EbnfMasks:
    """A compiled grammar's masks and the memos behind them (filled lazily from the scheduler's
    thread, the one that steps requests)."""

    def __init__(self, grammar: CompiledEbnf) -> None:
        self.g = weakref.proxy(grammar)  # (the grammar holds this: a strong reference back made every dropped grammar
        # cyclic garbage, ~40k objects that a full collection freed in a 25-90 ms pause on whatever thread it ran)
        vocab = grammar.vocab
        self.vocab = vocab
        self.width = bitmask_width(vocab.vocab_size)
        self._inside: dict[int, np.ndarray] = {}
        self._splits: dict[int, dict[int, np.ndarray]] = {}
        self._crossed: dict[tuple[int, int], tuple[np.ndarray, int]] = {}  # (offset, stack) -> (checked and allowed [2 width],
        # their address): verdicts at that stack
        self._shared_crossed: dict[tuple[int, int], tuple[np.ndarray, int]] = {}  # (offset, stack signature) -> (checked,
        # allowed and deep [3 width], their address): verdicts at every stack of that signature (ebnf_walk.loom_ebnf_cross)
        self._offset_scans: dict[tuple[int, int], tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        self._scan_rows = 0  # the split rows _splits and _offset_scans hold, and the latter's masks (kept as they are added)
        self._runs: dict[int, tuple[int, int, int]] = {}  # lexer state -> its run of safe bytes (ebnf_scan.safe_runs)
        self._rests: dict[tuple[int, int], np.ndarray] = {}
        self._sets: list[frozenset[int]] = []  # configurations interned for _accepted_from's vectorised walk
        self._set_of: dict[frozenset[int], int] = {}
        self._set_step: dict[int, int] = {}
        self._verdicts: dict[tuple[int, int, int], bool] = {}  # (interned configurations, token, position) -> accepted
        self._word_cache: dict[frozenset[int], np.ndarray] = {}
        self.eos_words = vocab.pack(sorted(t for t in vocab.eos_token_ids if t < vocab.vocab_size))
        self._masks: dict[frozenset[int], tuple[torch.Tensor, bool]] = {}
        self._walker: CrossingWalker | None = None
        self._ids: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}  # id(split row) -> (the row, its token ids,
        # their address and count): few tokens
        self._listed: dict[int, tuple[dict[int, np.ndarray], object]] = {}  # id(splits) -> (them, a key naming their content: their
        # offsets and ids, or a counted scan's key)
        self._across: dict[tuple[object, int], np.ndarray] = {}  # (_listed's key, or a shared row's serial; stack) -> the tokens
        # they let cross
        self._bulk: dict[int, tuple[np.ndarray, int, np.ndarray]] = {}  # id(split row) -> (it, unsafe buckets, its safe-tailed tokens)
        self._reach: dict[tuple[int, int], int] = {}  # (stack, unsafe buckets) -> _safe_reach
        self._across_shared: dict[tuple[object, int], tuple] = {}  # (_listed's key, stack signature) -> (what the
        # shallow walks of a scan's listed rows accept, the addresses of the deep tokens' ids and offsets and their
        # count (0, 0, 0: none), and those arrays): _cross_list
        self._shared: dict[int, tuple[np.ndarray, int]] = {}  # id(split row) -> (it, its serial): a counted scan's rows
        self._lists: dict[int, tuple[dict[int, np.ndarray], tuple[int, int, int], tuple]] = {}  # id(splits) -> (them, the
        # addresses of every row's ids and offsets and their count, counted_scan's `listed` holding those arrays)
        self._at: dict[int, tuple[np.ndarray, int]] = {}  # id(split row) -> (it, its address): _cross_rows
        self._runs_only: dict[int, tuple[dict[int, np.ndarray], list]] = {}  # id(splits) -> (them, _run_ends' rows)
        self._alone: dict[tuple[int, int], bool] = {}  # (terminal, stack after it) -> its splits inside a run change nothing (_run_ends)
        self._tops = TopFrames(grammar.stacks, grammar.n_lex) if grammar.stacks is not None else None  # (masks at stand-ins)

    def count(self) -> int:
        """How many packed masks are held."""
        return (len(self._inside) + self._scan_rows + 2 * len(self._crossed) + 3 * len(self._shared_crossed) + len(self._rests) + len(self._word_cache)
                + len(self._masks) + len(self._across) + len(self._across_shared) + len(self._bulk))  # fmt: skip

    @property
    def nbytes(self) -> int:
        return self.count() * self.eos_words.nbytes + (self._walker.nbytes if self._walker is not None else 0)

    def _bound(self) -> None:
        """Drop every cached mask once they pass MASK_CACHE_BYTES (recomputed as positions are visited)."""
        if self.count() * self.eos_words.nbytes > MASK_CACHE_BYTES:
            memos = (self._inside, self._splits, self._crossed, self._shared_crossed, self._offset_scans, self._rests, self._word_cache, self._masks)
            for memo in (*memos, self._ids, self._listed, self._across, self._across_shared, self._bulk, self._shared, self._lists, self._at,
                         self._runs_only):  # fmt: skip
                memo.clear()
            self._scan_rows = 0

    # ------------------------------------------------------------------ lexer-state scans
    def scan(self, lex: int) -> None:
        """The tokens that stay inside the lexeme from lexer state `lex`, and per offset j >= 1 the
        tokens that may end it after their first j bytes (packed masks)."""
        self._inside[lex], self._splits[lex] = self.scan_at(lex, 0)
        self._scan_rows += len(self._splits[lex])

    def prescan(self, deadline: float) -> int:
        """Scan lexer states ahead until `deadline` (time.monotonic()), on the compiling thread, so
        the masks that reach them find them done: each terminal's start state first (every lexeme
        boundary reads them), entered at a token's start and one byte in (a bracket or a comma
        ending a token's first byte, the rest starting a key), then the states inside the
        terminals, breadth first (every key's state after its quote, then after its first
        character, ...: a token such as `{"` leaves every key of an object there). -> how many
        scans were taken."""
        g = self.g
        starts = [g.offsets[t] for t in range(len(g.dfas))]
        depth = np.arange(g.boundary) - np.asarray(g.offsets)[np.asarray(g.lex_terminal, dtype=np.int64)]  # [lexer states]
        inner = np.argsort(depth, kind="stable")[len(starts) :].tolist()  # (the start states, depth 0, come first)
        done = 0
        for lex, offset in [(lex, 0) for lex in starts] + [(lex, 1) for lex in starts] + [(lex, 0) for lex in inner]:
            if time.monotonic() > deadline:
                break
            if offset:
                self.scan_at(lex, offset)
            elif lex not in self._inside:
                self.scan(lex)
            done += 1
        return done

    def _run(self, lex: int) -> tuple[int, int, int]:
        """Lexer state `lex`'s run of safe bytes (ebnf_scan.safe_runs; kept for every state its
        chain goes through)."""
        run = self._runs.get(lex)
        if run is None:
            g = self.g
            k = g.lex_terminal[lex]
            dfa, state, depth = g.dfas[k], lex - g.offsets[k], token_trie(self.vocab).max_depth
            if (state, depth) not in dfa.safe_runs:  # (kept with the automaton: a pattern's terminals in every grammar share it)
                for at, found in safe_runs(dfa.table, dfa.accepting, state, depth):
                    dfa.safe_runs.setdefault((at, depth), found)
            run = self._runs[lex] = dfa.safe_runs[(state, depth)]
        return run

    def scan_at(self, lex: int, offset: int) -> tuple[np.ndarray, dict[int, np.ndarray]]:
        """`scan` of the lexeme entered after each token's first `offset` bytes (tokens longer
        than that): a C walk of the token trie (skipping subtrees of safe bytes, ebnf_scan), or (no compiler) one vectorised pass of the vocabulary through the lexeme's
        DFA. Offsets past 0 are cached here."""
        if offset:
            hit = self._offset_scans.get((lex, offset))
            if hit is not None:
                return hit
        v = self.vocab
        g = self.g
        k = g.lex_terminal[lex]
        dfa = g.dfas[k]
        scanned = None
        shape, state = dfa.counted, lex - g.offsets[k]
        if shape is None and not offset:
            shape = string_contents(dfa, state)
            state = 0 if shape is not None else state
        counted = counted_scan(v, shape, state, offset) if shape is not None else None
        if counted is not None:  # a counted string's state between characters: the vocabulary's shared answer
            scanned = (counted.inside, counted.splits)
            for j, row in counted.rows.items():
                words = scanned[1][j]
                self._shared[id(words)] = (words, row.serial)
                if row.ids is not None and row.plain is None:
                    self._ids[id(words)] = (words, *row.ids)
                else:  # (a chunk's row at its end: its ASCII tokens cross unwalked where short, see _crossing)
                    unsafe = self._run(lex)[0]
                    self._bulk[id(words)] = (words, unsafe, split_tails(row, token_trie(v), j, unsafe))
            if counted.rows:
                self._listed[id(scanned[1])] = (scanned[1], counted.key)
            if counted.listed is not None:
                self._lists[id(scanned[1])] = (scanned[1], counted.listed[2], counted.listed)  # (holding the arrays)
        elif lexeme_scan_available():
            trie = token_trie(v)
            state = lex - g.offsets[k]
            found = shared_scan(trie, dfa, state, offset)  # (another terminal of the pattern, here or in another grammar)
            if found is None:
                ids: dict[int, tuple[np.ndarray, tuple[int, int]]] = {}
                bulk: dict[int, tuple[int, np.ndarray]] = {}
                scanned = lexeme_scan(trie, v, dfa.table, dfa.accepting, state, offset, self._run(lex), ids, bulk)
                found = keep_scan(trie, dfa, state, offset, scanned, ids, bulk) if scanned is not None else None
            if found is not None:  # the split rows of few tokens, and the row set in bulk, by identity (see _crossing)
                scanned = (found.inside, found.splits)
                for j, row in found.splits.items():
                    if j in found.ids:
                        self._ids[id(row)] = (row, *found.ids[j])
                    if j in found.bulk:
                        self._bulk[id(row)] = (row, *found.bulk[j])
                if found.named is not None:  # every row listed: their content names them (_cross_splits)
                    self._listed[id(found.splits)] = (found.splits, found.named)
                    if len(found.splits) >= _ONE_WALK_ROWS and found.listed[2][2] <= v.vocab_size:  # (crossed in one walk: _cross_list)
                        self._lists[id(found.splits)] = (found.splits, found.listed[2], found.listed)
        if scanned is None:
            idx = np.flatnonzero(v.lens > offset)
            st = np.full(len(idx), lex - g.offsets[k], dtype=np.int32)  # [n] DFA states
            inside: list[np.ndarray] = []
            splits: dict[int, np.ndarray] = {}
            for j in range(offset, v.data.shape[1] + 1):
                done = v.lens[idx] == j
                if done.any():
                    inside.append(idx[done])
                    keep = ~done
                    idx, st = idx[keep], st[keep]
                if not len(idx):
                    break
                if j > offset:  # ending where it starts is the boundary's own mask (see _words)
                    hit = dfa.accepting[st]
                    if hit.any():
                        splits[j] = v.pack(v.ids[idx[hit]])
                st = dfa.table[st, v.data[idx, j]]
                live = st != dfa.dead
                idx, st = idx[live], st[live]
            scanned = (v.pack(v.ids[np.concatenate(inside)] if inside else []), splits)
        if offset:
            self._offset_scans[(lex, offset)] = scanned
            self._scan_rows += 1 + len(scanned[1])
        return scanned

    # ------------------------------------------------------------------ tokens crossing a lexeme end
    def _accepted_after(self, offset: int, sid: int) -> np.ndarray:
        """Packed: the tokens longer than `offset` whose bytes from `offset` on are accepted from a
        lexeme boundary at stack `sid` (`_words`' decomposition, entered `offset` bytes into the
        tokens: the per-lexer-state scans are shared by every stack, the parser steps once per
        lexeme end). For many tokens at once, where walking each costs more."""
        key = (offset, sid)
        words = self._rests.get(key)
        if words is None:
            g = self.g
            words = np.zeros(self.width, dtype=np.uint32)
            for t in g.startable(sid):
                inside, splits = self.scan_at(g.offsets[t], offset)
                words |= inside
                after = g.after(sid, t) if splits else None
                if after is not None:
                    for part in self._run_ends(t, after, splits):
                        self._cross_splits(part, after, words)
            self._rests[key] = words
        return words

    def _run_ends(self, t: int, sid: int, splits: dict[int, np.ndarray]) -> list[dict[int, np.ndarray]]:
        """A scan's split rows for terminal `t` ending at stack `sid` (the stack after it), less the
        splits that change nothing. A token that may end the lexeme after j bytes and also after
        j + 1 (rows j and j + 1) has at byte j one of `t`'s staying bytes (an accepting state reads
        it into an accepting one: a digit of `[0-9]+`, a space of `WS: /[ \t\n]+/`). Where no
        terminal startable at `sid` starts with one, the split at j is dead, and where `t` is
        ignored and restarts (every accepting state reads each byte as its start state does),
        `t` itself starting with one there is its run going on. Then the token is crossed where
        its run ends, not at each of its bytes: ~80 rows of indentation tokens at a new stack (~1
        ms of a JSON Lark grammar's first mask), a number's digits where an operator must follow
        (~2 ms of an arithmetic grammar's mask at a 128k vocabulary)."""
        g = self.g
        staying = staying_bytes(g.dfas[t])
        if len(splits) < 2 or not staying:
            return [splits]
        alone = self._alone.get((t, sid))
        if alone is None:
            run = t in g.ignored and restarts(g.dfas[t])
            others = set().union(*(g.first_bytes(g.offsets[u]) for u in g.startable(sid) if not (run and u == t)))
            alone = self._alone[(t, sid)] = staying.isdisjoint(others)
        if not alone:
            return [splits]
        held = _held(self._runs_only, splits)
        if held is None:
            big, few, listed = split_at_run_ends(splits, _MANY, cross_walk_available())
            if listed is not None:  # (named by the rows they come from, held by ebnf_runs and here)
                self._listed[id(few)] = (few, ("run ends", id(splits)))
                self._lists[id(few)] = (few, listed[2], listed)
            held = self._runs_only[id(splits)] = (splits, [part for part in (big, few) if part])
        return held[1]

    def _cross_splits(self, splits: dict[int, np.ndarray], sid: int, out: np.ndarray) -> None:
        """`_crossing` of each of a scan's split rows at stack `sid`. Where the scan listed every
        row's tokens, what they let cross is kept by their content: other lexer states' scans often
        split the same tokens at the same offsets (a string's closing quote, from any position far
        enough from its maximum length), and then cost one lookup."""
        held = _held(self._listed, splits)
        key = (held[1], sid) if held is not None else None
        words = self._across.get(key) if key is not None else None
        listed = _held(self._lists, splits) if words is None and key is not None and cross_walk_available() else None
        if listed is not None:  # every row listed (a string's closing-quote rows): all in one walk
            words = self._across[key] = self._cross_list(held[1], sid, listed[2])
        if words is None:
            words = out if key is None else np.zeros(self.width, dtype=np.uint32)
            rows = list(splits.items())
            if len(rows) >= _ONE_CALL_ROWS and cross_walk_available():  # (a whitespace's or a string's dozens of rows)
                plain = [_held(self._shared, e) is None and _held(self._bulk, e) is None for _, e in rows]
                if sum(plain) >= _ONE_CALL_ROWS:
                    self._cross_rows([r for r, p in zip(rows, plain) if p], sid, words)
                    rows = [r for r, p in zip(rows, plain) if not p]
            for j, enders in rows:
                row = _held(self._shared, enders)
                if row is None:
                    self._crossing(j, sid, enders, words)
                    continue
                crossed = self._across.get((row[1], sid))  # a counted scan's row, shared by scans that differ elsewhere
                if crossed is None:
                    crossed = np.zeros(self.width, dtype=np.uint32)
                    self._crossing(j, sid, enders, crossed)
                    self._across[(row[1], sid)] = crossed  # (kept once filled: a BottomRead half-way keeps nothing)
                words |= crossed
            if key is not None:
                self._across[key] = words
        if words is not out:
            out |= words

    def _cross_list(self, name: object, sid: int, listed: tuple[np.ndarray, np.ndarray, tuple[int, int, int]]) -> np.ndarray:
        """The tokens of a scan's split rows, every one listed (`listed`: their ids, their offsets and
        the addresses of both, from counted_scan or shared_scans; `name`: their content), accepted
        at stack `sid`, in one walk: a string's closing-quote rows, or a number's dozens of rows
        (it may end after any digit of a long token), one C call instead of one per row.
        What the shallow walks accept holds at every stack of sid's signature and is kept (see
        ebnf_walk.CrossingWalker.cross): at another such stack only the deep tokens are walked."""
        if self._walker is None:
            self._walker = CrossingWalker(self.g)
        key = (name, self.g.signature(sid))
        held = self._across_shared.get(key)
        if held is not None:
            words = held[0].copy()
            if held[1][2]:
                self._walker.cross_list(sid, held[1], words)
            return words
        words, deep = np.zeros(self.width, dtype=np.uint32), np.zeros(self.width, dtype=np.uint32)
        self._walker.cross_list(sid, listed[2], words, deep)
        if not deep.any():  # (the usual: every walk shallow)
            self._across_shared[key] = (words.copy(), (0, 0, 0))
            return words
        ids, offs = listed[0], listed[1]
        sel = (deep[ids >> 5] >> (ids & 31).astype(np.uint32) & 1).astype(bool)
        ids, offs = np.ascontiguousarray(ids[sel]), np.ascontiguousarray(offs[sel])
        self._across_shared[key] = (words & ~deep, (ids.ctypes.data, offs.ctypes.data, len(ids)), ids, offs)
        return words

    def _crossing(self, offset: int, sid: int, enders: np.ndarray, out: np.ndarray) -> None:
        """out |= the tokens of `enders` (packed) whose bytes from `offset` on are accepted from a
        lexeme boundary at stack `sid`. A token's verdict depends on nothing else, so each is
        checked once per (offset, stack), or per (offset, stack signature) where its walk read no
        more of the stack (ebnf_walk.CrossingWalker.cross): walked in C or Python (`_accepted_from`),
        or, for a lexeme ending inside most tokens (a string's chunks), by lexer-state scans."""
        held = _held(self._bulk, enders)
        if held is not None:  # the tokens whose remainders stay inside a lexeme startable here
            reach = self._safe_reach(sid, held[1])
            if reach:
                trie = token_trie(self.vocab)
                short = held[2] & safe_mask(trie, 0, min(offset + reach, trie.max_depth))
                out |= short
                enders = enders & ~short
        own = self._memo(self._crossed, (offset, sid), 2)
        if cross_walk_available():
            if self._walker is None:
                self._walker = CrossingWalker(self.g)
            shared = self._memo(self._shared_crossed, (offset, self.g.signature(sid)), 3)
            held = _held(self._ids, enders)
            if held is not None:
                ids, at_enders = held[2], 0
            else:
                ids, at_enders = None, np.ascontiguousarray(enders).ctypes.data
            if self._walker.cross_at(offset, sid, at_enders, shared[1], own[1], out.ctypes.data, _MANY, ids):
                return
        checked, allowed = own[0][: self.width], own[0][self.width :]
        many = True
        if not cross_walk_available():
            new = enders & ~checked
            many = int(np.bitwise_count(new).sum()) > _MANY
            if not many and new.any():
                allowed |= pack_ids(self._accepted_from(offset, sid, unpack_ids(new)), len(allowed))
                checked |= new
        if many:
            allowed[:] = self._accepted_after(offset, sid)
            checked[:] = np.uint32(0xFFFFFFFF)
        out |= allowed & enders

    def _memo(self, memos: dict[tuple[int, int], tuple[np.ndarray, int]], key: tuple[int, int], n: int) -> tuple[np.ndarray, int]:
        """memos[key]: n zeroed words [n width] (and their address) where it is new."""
        if key not in memos:
            self._memos(memos, [key], n)
        return memos[key]

    def _memos(self, memos: dict[tuple[int, int], tuple[np.ndarray, int]], keys: list[tuple[int, int]], n: int) -> None:
        """`_memo` of each key, the new ones zeroed in one allocation (dozens of rows at a new stack)."""
        new = [key for key in keys if key not in memos]
        block = np.zeros((len(new), n * self.width), dtype=np.uint32)
        at, size = block.ctypes.data, block.strides[0]  # (an array's .ctypes costs ~3 µs: addresses by offset)
        for k, (key, words) in enumerate(zip(new, block)):
            memos[key] = (words, at + k * size)

    def _address(self, words: np.ndarray) -> int:
        """The data address of a split row, kept (an array's .ctypes costs ~3 µs)."""
        held = _held(self._at, words)
        if held is None:
            held = self._at[id(words)] = (words, words.ctypes.data)
        return held[1]

    def _cross_rows(self, rows: list[tuple[int, np.ndarray]], sid: int, out: np.ndarray) -> None:
        """`_crossing` of split rows (offset, enders) none of which is set in bulk, at stack `sid`,
        in one C call: the same walks and memos (per offset and stack, per offset and signature)
        without a Python call per row (the whitespace before a word ends at byte 1 of ~20k tokens,
        at every offset of the other rows: ~65 rows, ~10 µs of Python each)."""
        if self._walker is None:
            self._walker = CrossingWalker(self.g)
        signature = self.g.signature(sid)
        self._memos(self._crossed, [(j, sid) for j, _ in rows], 2)
        self._memos(self._shared_crossed, [(j, signature) for j, _ in rows], 3)
        spec = []
        for j, enders in rows:
            held = _held(self._ids, enders)
            ids, at = (held[2], 0) if held is not None else ((0, 0), self._address(enders))
            spec.append((at, *ids, self._shared_crossed[(j, signature)][1], self._crossed[(j, sid)][1], j))
        skipped = self._walker.cross_rows(sid, np.array(spec, dtype=np.int64), out, _MANY)
        for k in np.flatnonzero(skipped).tolist():  # (too many to walk: scanned)
            j, enders = rows[k]
            self._crossing(j, sid, enders, out)

    def _safe_reach(self, sid: int, unsafe: int) -> int:
        """How many bytes outside the `unsafe` buckets in a row stay inside some lexeme startable at
        a boundary at stack `sid` (the longest safe run from a start state whose own unsafe buckets
        are among these): a token whose bytes after a lexeme end are all such, and at most this many,
        is accepted there, unwalked. 0: none."""
        key = (sid, unsafe)
        out = self._reach.get(key)
        if out is None:
            out = 0
            for t in self.g.startable(sid):
                t_unsafe, length, _ = self._run(self.g.offsets[t])
                if not t_unsafe & ~unsafe:
                    out = max(out, length)
            if len(self._reach) > _CACHE_LIMIT // 100:
                self._reach.clear()
            self._reach[key] = out
        return out

    def _accepted_from(self, offset: int, sid: int, ids: np.ndarray) -> np.ndarray:
        """The token ids of `ids` whose bytes from `offset` on are accepted from a lexeme boundary at
        stack `sid`: the tokens walked together byte position by byte position, one parser step
        per distinct (configurations, byte) at each position, as a walk of their trie would."""
        v = self.vocab
        g = self.g
        if len(self._set_of) > _CACHE_LIMIT or len(self._verdicts) > 4 * _CACHE_LIMIT:
            self._set_of.clear(), self._sets.clear(), self._set_step.clear(), self._verdicts.clear()
        rows = np.searchsorted(v.ids, ids)  # [n] rows of the vocabulary matrix
        left = v.lens[rows] - offset  # [n] bytes still to walk
        st = np.full(len(rows), self._set_id(frozenset({sid * g.n_lex + g.boundary})), dtype=np.int64)
        found: list[np.ndarray] = []
        for j in range(offset, v.data.shape[1] + 1):
            done = left == j - offset
            if done.any():
                found.append(ids[done])
                keep = ~done
                ids, rows, left, st = ids[keep], rows[keep], left[keep], st[keep]
            if len(ids) <= _FEW:  # the vectorised step costs more than walking these one by one
                found.append(np.asarray(self._walk_each(ids, st, j), dtype=np.int64))
                break
            uniq, inv = np.unique(st * 256 + v.data[rows, j], return_inverse=True)
            st = np.array([self._next_set(int(k)) for k in uniq], dtype=np.int64)[inv]
            live = st >= 0
            ids, rows, left, st = ids[live], rows[live], left[live], st[live]
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)

    def _walk_each(self, ids: np.ndarray, sets: np.ndarray, j: int) -> list[int]:
        """The token ids of `ids` whose bytes from `j` on lead their interned configurations `sets` to
        some. Verdicts are kept per (configurations, token, position): a token crossing several
        lexeme ends (a run of whitespace) is checked at each, and its walks meet again."""
        found: list[int] = []
        memo = self._verdicts
        for t, s in zip(ids.tolist(), sets.tolist()):
            data = self.vocab.by_id[t]
            path: list[tuple[int, int, int]] = []
            ok = True
            for p in range(j, len(data)):
                key = (s, t, p)
                known = memo.get(key)
                if known is not None:
                    ok = known
                    break
                path.append(key)
                s = self._next_set(s * 256 + data[p])
                if s < 0:
                    ok = False
                    break
            for key in path:
                memo[key] = ok
            if ok:
                found.append(t)
        return found

    def _set_id(self, configs: frozenset[int]) -> int:
        out = self._set_of.get(configs)
        if out is None:
            out = self._set_of[configs] = len(self._sets)
            self._sets.append(configs)
        return out

    def _next_set(self, key: int) -> int:
        """Interned configurations `key // 256` stepped by byte `key % 256` (-1: none left)."""
        out = self._set_step.get(key)
        if out is None:
            nxt = self.g.step(self._sets[key >> 8], key & 255)
            out = self._set_step[key] = self._set_id(nxt) if nxt else -1
        return out

    # ------------------------------------------------------------------ masks
    def _words(self, configs: frozenset[int]) -> np.ndarray:
        """Packed non-EOS tokens allowed from `configs` (cached).

        A token either stays inside a lexeme (the scanned `inside` mask), or ends it after j bytes
        and the rest starts at a boundary at the stack after it: j == 0 is the boundary's own
        mask (recursion; a lexeme's start states never accept), j >= 1 walks the remainders of
        the tokens that may end it there (`_crossing`)."""
        words = self._word_cache.get(configs)
        if words is not None:
            return words
        g = self.g
        words = np.zeros(self.width, dtype=np.uint32)
        for c in configs:
            sid, lexes = g.lexemes(c)
            for lex in lexes:
                if lex not in self._inside:
                    self.scan(lex)
                words |= self._inside[lex]
                splits = self._splits[lex]
                if not splits and not g.accepting[lex]:
                    continue
                after = g.after(sid, g.lex_terminal[lex])
                if after is None:
                    continue
                if g.accepting[lex]:
                    words |= self._words(frozenset({after * g.n_lex + g.boundary}))
                for part in self._run_ends(g.lex_terminal[lex], after, splits) if splits else ():
                    self._cross_splits(part, after, words)
        if len(self._word_cache) > _CACHE_LIMIT // 100:
            self._word_cache.clear()
        self._word_cache[configs] = words
        return words

    def mask(self, configs: frozenset[int]) -> tuple[torch.Tensor, bool]:
        """-> (packed mask [ceil(V / 32)] int32, whether any non-EOS token is allowed)."""
        hit = self._masks.get(configs)
        if hit is not None:
            return hit
        self._bound()
        words = self._tops.taken(configs, self._words) if self._tops is not None else self._words(configs)
        more = bool(words.any())
        if self.g.can_end(configs):
            words = words | self.eos_words
        if len(self._masks) > _CACHE_LIMIT // 100:
            self._masks.clear()
        entry = self._masks[configs] = (torch.from_numpy(words.view(np.int32)), more)
        return entry
