"""Lexer-state scans of a JSON string's contents (a `minLength` / `maxLength` string's terminals, and
any unbounded string's), answered from the vocabulary's character profile and shared by every
grammar over the vocabulary.

    found = counted_scan(vocab, shape, state, 0)   -> CountedScan (inside, split rows), or None
    shape = string_contents(dfa, state)             an unbounded string's contents, in any terminal

A counted string's automaton (schema_automata.counted_string_dfa) is a chain of copies of one JSON
string character's automaton: between characters, a state says only how many have been read. A
scan from there depends on the tokens' characters alone: per token, how many whole ones it holds,
whether it ends inside one more, what stops it (its end, a quote between characters, a byte no
string holds) and where each character ends. That profile is taken once per vocabulary (C, every
token walked: a few ms at 128k tokens, on a compile thread, with the masks below), and a scan
becomes lookups:
  - the tokens that stay inside: those read to their end having begun at most `allow` more
    characters (a packed mask per count, built once);
  - a closing quote's split rows: the tokens whose quote comes after need..allow characters, by the
    offset after it (a row is shared while its tokens' counts all lie in the range);
  - a chunk's (a lexeme of exactly k more characters, no quote) rows: its ASCII tokens longer than
    k all split at k; the others' rows, per k, were made with the profile.
Rows carry serials, so ebnf_masks keeps what a row lets cross per stack across scans.

The generic scan (ebnf_scan.lexeme_scan) walks every non-ASCII token node by node here (a lead
byte leads to a state no ASCII byte does, so it is never "safe"): 0.3-0.5 ms a state at 128k
tokens, and a `maxLength: 1024` string meets two new states at nearly every one of its first 64
steps. Scans entered mid-token, and states inside a character, stay generic.
"""


from __future__ import annotations

import ctypes
import functools
import itertools
import os
import threading
import time
from dataclasses import dataclass

import numpy as np

from loom.runtime.constrained.bitmask import pack_ids
from loom.runtime.constrained.dfa import ByteDFA, terminal_dfa
from loom.runtime.constrained.ebnf_scan import safe_run
from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.schema_automata import STRING_CHAR, CountedShape, counted_string_dfa
from loom.runtime.constrained.token_walk import ALL_BUCKETS, BUCKET_BIT, TokenTrie, last_unsafe_byte, token_trie
from loom.runtime.constrained.vocabulary import TokenVocab

_C_SOURCE = r"""
#include <stdint.h>
/* Each token (row r of the padded byte matrix `data` [n, stride], id ids[r]) read as JSON string
   characters (`unit`: one character's DFA [S, 256], start 0, `done` after a whole character,
   `dead`): chars[t] complete characters, partial[t] = 1 where it ends inside one more, stop[t] = 1
   (its end), 2 (a quote between characters, at byte quote[t]) or 3 (a byte no string holds there).
   Character k of token t (1-based) ends after byte ends[first[t] + k - 1]. */
void loom_counted_profile(const uint8_t *data, int64_t stride, const int64_t *lens, const int64_t *ids, int64_t n,
                          const int32_t *unit, int32_t done, int32_t dead, int16_t *chars, uint8_t *partial,
                          uint8_t *stop, int16_t *quote, int32_t *first, int16_t *ends) {
    int32_t at = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t len = lens[r], t = ids[r];
        const uint8_t *b = data + r * stride;
        int32_t u = 0, k = 0;
        uint8_t why = 1;
        first[t] = at;
        for (int64_t d = 0; d < len; d++) {
            int32_t next = unit[(int64_t)u * 256 + b[d]];
            if (next == done) { k++; ends[at++] = (int16_t)(d + 1); u = 0; continue; }
            if (next == dead) {
                why = (u == 0 && b[d] == '"') ? 2 : 3;
                quote[t] = (int16_t)d;
                break;
            }
            u = next;
        }
        chars[t] = (int16_t)k;
        partial[t] = (why == 1 && u != 0);
        stop[t] = why;
    }
}
"""

END, QUOTE, DEAD = 1, 2, 3  # what stops a token's characters (the profile's `stop`)
PAIRS = 8192  # a split row of more tokens is crossed from its packed words, not its ids (as ebnf_scan's)
_FEW = 2048  # a row of at most this many tokens is packed from its ids (no vocabulary-sized buffer)
_KEPT = 512  # per profile: masks and rows kept (by allowance, by row); past this they start afresh
_LOCK = threading.Lock()
_SERIAL = itertools.count()
_PLAIN = np.array([b for b in range(0x20, 0x7F) if b not in b'"\\'])  # one-byte characters: printable ASCII but quote and backslash
_ASCII_BUCKETS = int(np.bitwise_or.reduce(BUCKET_BIT[_PLAIN]))  # their byte buckets
# (the byte buckets of printable ASCII but the quote and backslash: DEL shares the controls' bucket)


@dataclass(frozen=True, slots=True)
class Row:
    """One split row of a counted scan: packed words, the token ids where there are at most PAIRS
    of them (with their address and count), a serial naming it (rows are shared by the scans that
    split the same tokens there), and per unsafe byte set its tokens whose later bytes are safe."""

    words: np.ndarray
    ids: tuple[np.ndarray, tuple[int, int]] | None
    serial: int
    tails: dict[int, np.ndarray]
    plain: np.ndarray | None = None  # a chunk's row at k: its ASCII tokens (packed), and the row of the others
    other: Row | None = None


@dataclass(frozen=True, slots=True)
class CountedScan:
    """ebnf_scan.lexeme_scan's answer (inside, and the split rows by offset), and a key naming
    the rows (two scans with one key split the same tokens at the same offsets)."""

    inside: np.ndarray
    rows: dict[int, Row]
    key: tuple[tuple[int, int], ...]
    listed: tuple[np.ndarray, np.ndarray, tuple[int, int, int]] | None = None  # every row's ids, their offsets
    # (ascending) and (both addresses, count), where every row has its ids: crossed in one walk

    @property
    def splits(self) -> dict[int, np.ndarray]:
        return {j: row.words for j, row in self.rows.items()}


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_NO_C_EBNF"):
        return None
    lib = compile_c(_C_SOURCE, "loom_counted_profile", "the counted-string profile")
    if lib is None:
        return None
    fn = lib.loom_counted_profile
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    fn.argtypes += [ctypes.c_int32, ctypes.c_int32] + [ctypes.c_void_p] * 6
    return lib


def available() -> bool:
    return _library() is not None


@functools.cache
def _unit() -> tuple[np.ndarray, int, int]:
    """One JSON string character's automaton: (table [S + 1, 256] int32, its state after a whole
    character, dead)."""
    unit = terminal_dfa(STRING_CHAR, "a JSON string character")
    (done,) = np.flatnonzero(unit.accepting)
    return np.ascontiguousarray(unit.table, dtype=np.int32), int(done), unit.dead


def _pack(ids: np.ndarray, width: int) -> np.ndarray:
    """Token ids -> packed words [width] uint32 (read-only: shared by every grammar)."""
    if len(ids) <= _FEW:
        out = pack_ids(ids, width)
    else:
        bits = np.zeros(width * 32, dtype=bool)
        bits[ids] = True
        out = np.packbits(bits, bitorder="little").view(np.uint32)
    out.flags.writeable = False
    return out


def _row(ids: np.ndarray, width: int) -> Row:
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    listed = (ids, (ids.ctypes.data, len(ids))) if len(ids) <= PAIRS else None
    return Row(_pack(ids, width), listed, next(_SERIAL), {})


class _Prefix:
    """Token ids by a key (characters), with the packed masks of those whose key is at most x, for
    every x up to the largest key: built once, each from the one before (2.2 MB at 128k tokens)."""

    def __init__(self, ids: np.ndarray, keys: np.ndarray, width: int) -> None:
        order = np.argsort(keys, kind="stable")  # (16-bit keys: a radix sort)
        self.ids, self.keys = ids[order], keys[order].astype(np.int64)
        top = int(self.keys[-1]) if len(self.keys) else 0
        bounds = np.searchsorted(self.keys, np.arange(top + 1), side="right")
        words = _pack(self.ids[: bounds[0]], width)
        self.masks = [words]
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            words = words | _pack(self.ids[lo:hi], width) if hi > lo else words
            words.flags.writeable = False
            self.masks.append(words)

    def within(self, x: int) -> np.ndarray:
        return self.masks[min(max(x, 0), len(self.masks) - 1)]


class _Profile:
    """The vocabulary's tokens read as string characters (loom_counted_profile, indexed by token
    id: stop 0 where it is not a token), in the orders the scans slice, with the masks and rows
    they built (kept for every later scan)."""

    def __init__(self, vocab: TokenVocab, trie: TokenTrie, lib: ctypes.CDLL) -> None:
        size, self.width = trie.width * 32, trie.width
        chars = np.zeros(size, dtype=np.int16)
        partial, stop = np.zeros(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)
        quote, first = np.zeros(size, dtype=np.int16), np.zeros(size, dtype=np.int32)
        ends = np.zeros(max(int(vocab.lens.sum()), 1), dtype=np.int16)
        data = np.ascontiguousarray(vocab.data)
        table, done, dead = _unit()
        arrays = (chars, partial, stop, quote, first, ends)
        lib.loom_counted_profile(data.ctypes.data, data.shape[1], vocab.lens.ctypes.data, vocab.ids.ctypes.data, len(vocab.ids),
                                 table.ctypes.data, done, dead, *(a.ctypes.data for a in arrays))  # fmt: skip
        lens = trie.tok_len
        # the tokens read to their end, by characters begun (a maximum keeps a prefix of them)
        ended = np.flatnonzero(stop == END)
        self.ended = _Prefix(ended, (chars[ended] + partial[ended]).astype(np.int16), self.width)
        self.max_chars = int(self.ended.keys[-1]) if len(ended) else 0
        # a chunk's split rows: the tokens of one-byte characters only (ASCII), by length; the others by
        # (characters k, the offset after the k-th), for each k they hold
        plain = ((trie.tok_buckets & np.uint64(~_ASCII_BUCKETS & ALL_BUCKETS)) == 0) & (stop == END)  # (no byte of another bucket)
        ascii_ids = np.flatnonzero(plain)
        self.plain = _Prefix(ascii_ids, lens[ascii_ids].astype(np.int16), self.width)
        self.plain_all = _pack(ascii_ids, self.width)
        mixed = np.flatnonzero((chars > 0) & ~plain)
        tok = np.repeat(mixed, chars[mixed])
        k = np.arange(len(tok)) - np.repeat(np.cumsum(chars[mixed]) - chars[mixed], chars[mixed]) + 1
        at = ends[first[tok] + k - 1].astype(np.int64)
        longer = lens[tok] > at
        tok, k, at = tok[longer], k[longer], at[longer]
        order = np.lexsort((at, k))
        tok, k, at = tok[order], k[order], at[order]
        bounds = np.flatnonzero(np.diff(k * 65536 + at, prepend=-1, append=-1))
        self.mixed_rows: dict[int, dict[int, Row]] = {}
        for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            self.mixed_rows.setdefault(int(k[lo]), {})[int(at[lo])] = _row(tok[lo:hi], self.width)
        # the tokens stopped by a quote, by (the offset after it, characters before it)
        quoted = np.flatnonzero(stop == QUOTE)
        after = quote[quoted].astype(np.int64) + 1
        order = np.lexsort((chars[quoted], after))
        self.q_ids, self.q_after, self.q_chars = quoted[order], after[order], chars[quoted][order].astype(np.int64)
        self.q_whole = lens[self.q_ids] == self.q_after  # the quote is the token's last byte
        starts = np.flatnonzero(np.diff(self.q_after, prepend=-1))  # one row per offset after the quote
        bounds = np.append(starts, len(self.q_ids))
        self.q_rows = [(int(self.q_after[lo]), int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]  # (j, lo, hi)
        self.q_min, self.q_max = self.q_chars[starts], self.q_chars[bounds[1:] - 1]  # per row (chars ascend in it)
        self.full_rows: list[tuple[Row | None, np.ndarray] | None] = [None] * len(self.q_rows)
        self.max_chars = max(self.max_chars, int(chars.max()))  # (every token's, however it stops)
        self.kept: dict[object, object] = {}
        self.answers: dict[tuple[int, int, bool], CountedScan] = {}  # by (need, allow, close)

    def _keep(self, key: object, value: object) -> None:
        if len(self.kept) >= _KEPT:
            self.kept.clear()
        self.kept[key] = value

    def chunk_rows(self, k: int) -> dict[int, Row]:
        """The rows of a lexeme that ends after exactly k more characters: the tokens holding more,
        at the offset after their k-th. The ASCII ones all split at k: that row is made here (its
        ASCII part kept for split_tails); the others' rows were made with the profile."""
        rows = dict(self.mixed_rows.get(k, {}))
        n = len(self.plain.ids) - int(np.searchsorted(self.plain.keys, k, side="right"))
        if n:
            longer = self.plain_all & ~self.plain.within(k)
            other = rows.get(k)
            words = longer if other is None else longer | other.words
            words.flags.writeable = False
            rows[k] = Row(words, None, next(_SERIAL), {}, longer, other)  # (crossed by its words: ebnf_masks' bulk rows)
        return rows

    def quote_rows(self, need: int, allow: int) -> tuple[np.ndarray, dict[int, Row]]:
        """(packed: the tokens whose quote, after need..allow characters, is their last byte; the
        rows of the longer ones, by the offset after the quote). A row whose tokens' characters
        all lie in need..allow is the row in full, shared by every such scan; a row cut short is
        kept by its offset and the characters it keeps."""
        c_lo, c_hi = np.maximum(self.q_min, need), np.minimum(self.q_max, allow)
        key = np.where(c_lo <= c_hi, c_lo * 65536 + c_hi, -1).tobytes()  # (what each row keeps: one answer per such)
        held = self.kept.get(key)
        if held is None:
            held = self._quote_rows(c_lo, c_hi)
            self._keep(key, held)
        return held

    def _quote_rows(self, c_lo: np.ndarray, c_hi: np.ndarray) -> tuple[np.ndarray, dict[int, Row]]:
        rows: dict[int, Row] = {}
        whole: list[np.ndarray] = []
        for r in np.flatnonzero(c_lo <= c_hi).tolist():
            j, lo, hi = self.q_rows[r]
            if c_lo[r] == self.q_min[r] and c_hi[r] == self.q_max[r]:
                row, ends = self.full(r)
            else:
                key = (j, int(c_lo[r]), int(c_hi[r]))
                held = self.kept.get(key)
                if held is None:
                    chars = self.q_chars[lo:hi]
                    a, b = lo + np.searchsorted(chars, c_lo[r]), lo + np.searchsorted(chars, c_hi[r], side="right")
                    held = self._split(a, b)
                    self._keep(key, held)
                row, ends = held
            whole.append(ends)
            if row is not None:
                rows[j] = row
        return _pack(np.concatenate(whole) if whole else np.zeros(0, dtype=np.int64), self.width), rows

    def full(self, r: int) -> tuple[Row | None, np.ndarray]:
        held = self.full_rows[r]
        if held is None:
            held = self.full_rows[r] = self._split(*self.q_rows[r][1:])
        return held

    def _split(self, a: int, b: int) -> tuple[Row | None, np.ndarray]:
        """The quoted tokens a..b (of one row): (the row of those longer than the quote, those ending there)."""
        ends_here = self.q_whole[a:b]
        longer = self.q_ids[a:b][~ends_here]
        return (_row(longer, self.width) if len(longer) else None), self.q_ids[a:b][ends_here]


def _profile(vocab: TokenVocab, trie: TokenTrie, lib: ctypes.CDLL) -> _Profile:
    with _LOCK:
        held = _HELD.get(id(trie))
        if held is None or held[0] is not trie:
            while len(_HELD) >= 4:
                del _HELD[next(iter(_HELD))]
            held = _HELD[id(trie)] = (trie, _Profile(vocab, trie, lib))
        return held[1]


_HELD: dict[int, tuple[TokenTrie, _Profile]] = {}


@functools.cache
def _contents() -> tuple[np.ndarray, np.ndarray, CountedShape]:
    """A JSON string's contents and closing quote (any length): (table, accepting, shape), state 0."""
    dfa = counted_string_dfa(0, None, False, True)
    assert dfa.counted is not None
    return dfa.table, dfa.accepting, dfa.counted


def string_contents(dfa: ByteDFA, state: int) -> CountedShape | None:
    """The shape of a JSON string's contents (any length, then the closing quote) where `state` of
    `dfa` accepts exactly what remains of one (an unbounded string's state inside it, in any
    terminal: a plain string, a scalar's string branch), so its scan is the vocabulary's shared
    one; else None. Answered for every state of the automaton at once, on first use (a compile
    does it: mark_string_states), and kept with it."""
    if not dfa.string_states:
        mark_string_states(dfa)
    return _contents()[2] if dfa.string_states.get(state) else None


def mark_string_states(dfa: ByteDFA) -> None:
    """Fill dfa.string_states: the states that loop on every plain byte, as a string's contents do,
    walked together with the reference automaton (equal residual languages: every pair of states
    met agrees on acceptance and on which bytes die)."""
    table, accepting = dfa.table, dfa.accepting
    ref_table, ref_accepting, _ = _contents()
    dead, ref_dead = table.shape[0] - 1, ref_table.shape[0] - 1
    loops = np.flatnonzero((table[:-1, _PLAIN] == np.arange(dead)[:, None]).all(axis=1))
    found = {-1: False}  # (never a state: marks the automaton done)
    for state in loops.tolist():
        same, pairs, todo = True, {(state, 0)}, [(state, 0)]
        while same and todo:
            p, q = todo.pop()
            if accepting[p] != ref_accepting[q]:
                same = False
                break
            for key in np.unique(table[p].astype(np.int64) * (ref_dead + 1) + ref_table[q]).tolist():
                pair = divmod(key, ref_dead + 1)
                if (pair[0] == dead) != (pair[1] == ref_dead):
                    same = False
                    break
                if pair not in pairs and pair[0] != dead:
                    pairs.add(pair)
                    todo.append(pair)
        found[state] = same
    dfa.string_states.update(found)


def warm(vocab: TokenVocab) -> None:
    """Take the vocabulary's profile now, once (a compile thread's job: tens of ms at 128k tokens)."""
    lib = _library()
    trie = token_trie(vocab)
    held = _HELD.get(id(trie))
    if lib is None or (held is not None and held[0] is trie):
        return
    prof = _profile(vocab, trie, lib)
    with _LOCK:  # the quote rows in full
        for r in range(len(prof.q_rows)):
            prof.full(r)
    counted_scan(vocab, _contents()[2], 0, 0)  # (a string's contents: every schema's)
    table, accepting, _ = _contents()  # and where its bytes are safe (split_tails' lookups)
    last_unsafe_byte(trie, safe_run(table, accepting, 0, trie.max_depth)[0])


def warm_counts(vocab: TokenVocab, shape: CountedShape, deadline: float) -> bool:
    """Every count's scan answer of a counted string's lexeme, now (a compile thread's job: ~10 ms
    at 128k tokens for a long string's chunk and tails, once per process, as answers are shared by
    every grammar), not at the first mask that reaches each count (~0.1-0.35 ms each there: a
    chunked `maxLength: 1024` string met a new count at nearly every one of its first masks).
    Stops at `deadline` (time.monotonic()): a schema of many differently bounded strings leaves
    the rest to its masks. -> whether every count was taken."""
    for state in np.flatnonzero(shape.copy >= 0).tolist():
        if time.monotonic() > deadline:
            return False
        counted_scan(vocab, shape, state, 0)
    return True


def counted_scan(vocab: TokenVocab, shape: CountedShape, state: int, offset: int) -> CountedScan | None:
    """The scan of a counted string's lexeme from `state` (ebnf_scan.lexeme_scan's answer, entered
    after each token's first `offset` bytes); None where the generic scan must answer: `state` is
    not between characters, the scan is entered mid-token, the lexeme ends without a quote after a
    range of counts, or no C compiler is at hand. Answers are shared by every grammar."""
    read = int(shape.copy[state])
    lib = _library()
    if read < 0 or offset or lib is None:
        return None
    trie = token_trie(vocab)
    prof = _profile(vocab, trie, lib)
    if not shape.close and shape.lo != shape.hi:  # (a chunk ends after exactly so many characters; others: the generic scan)
        return None
    most = prof.max_chars  # no token holds more characters: larger bounds are all the same
    need = min(max(shape.lo - read, 0), most + 1)  # characters before the lexeme may end
    allow = most + 1 if shape.hi is None else min(shape.hi - read, most + 1)  # characters it may still take
    key = (need, allow, shape.close)
    with _LOCK:  # (the profile's kept masks and rows: scans run on the scheduler's and the compile threads)
        found = prof.answers.get(key)
        if found is None:
            inside = prof.ended.within(allow)
            if shape.close:  # a token ending at the quote stays inside; a longer one crosses the lexeme's end
                whole, rows = prof.quote_rows(need, allow)
                inside = inside | whole
            else:  # (need == allow: past every token's characters, no row)
                rows = prof.chunk_rows(allow) if 0 < allow <= most else {}
            found = CountedScan(inside, rows, tuple(sorted((j, row.serial) for j, row in rows.items())), _listed(rows))
            if len(prof.answers) >= _KEPT:
                prof.answers.clear()
            prof.answers[key] = found
    return found


def _listed(rows: dict[int, Row]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]] | None:
    if not rows or any(row.ids is None for row in rows.values()):
        return None
    return listed_rows({j: row.ids[0] for j, row in rows.items()})


def listed_rows(by_row: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Split rows given as token ids (offset j -> ids) as one list for ebnf_walk's cross_list: every
    row's ids, each one's offset (ascending), and the addresses of both and their count."""
    rows = sorted(by_row)
    ids = np.ascontiguousarray(np.concatenate([by_row[j] for j in rows]), dtype=np.int64)
    offs = np.repeat(np.asarray(rows, dtype=np.int64), [len(by_row[j]) for j in rows])
    return ids, offs, (ids.ctypes.data, offs.ctypes.data, len(ids))


def split_tails(row: Row, trie: TokenTrie, j: int, unsafe: int) -> np.ndarray:
    """Row j's tokens whose bytes after the j-th are all outside the `unsafe` buckets (ebnf_masks
    crosses the short ones unwalked), kept with the row. A chunk's ASCII part counts whole where
    the set leaves ASCII string bytes safe; the rest are looked up."""
    tails = row.tails.get(unsafe)
    if tails is None:
        if row.plain is not None and not _ASCII_BUCKETS & unsafe:
            tails = row.plain if row.other is None else row.plain | split_tails(row.other, trie, j, unsafe)
        elif row.ids is not None:
            ids = row.ids[0]
            tails = _pack(ids[last_unsafe_byte(trie, unsafe)[ids] <= j], trie.width)
        else:
            tails = row.words & np.packbits(last_unsafe_byte(trie, unsafe) <= j, bitorder="little").view(np.uint32)
        tails.flags.writeable = False
        row.tails[unsafe] = tails
    return tails
