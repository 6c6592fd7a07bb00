"""Lexer-state scans shared by every grammar on one vocabulary.

    found = shared_scan(trie, dfa, state, offset)     None: not kept
    found = keep_scan(trie, dfa, state, offset, ...)  after a scan: kept, and returned

A terminal's automaton is one object wherever its pattern recurs (dfa.terminal_dfa keeps them by
pattern): an object's `{` and whitespace, an array's `[`, a key's name. The JSON-Schema grammars
give each object and array its own terminal of the same pattern (the LALR table needs them apart),
and a schema's keys recur in the next schema. What a scan of the vocabulary's trie finds from a
state of an automaton (ebnf_scan.lexeme_scan) depends on the automaton, the state, the offset and
the vocabulary, nothing else, so it is kept per vocabulary and looked up by the automaton's
identity: the second `[` of a grammar, or the next grammar's, costs a lookup instead of a scan
(~100 µs each at 128k tokens). The entry holds its automaton, so an identity is never reused
while it is kept, and counts the automaton's table in its size: what the cache keeps alive stays
within SHARED_SCAN_BYTES (the least recently used go), however large the automata it met.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from loom.runtime.constrained.counted_scan import listed_rows

if TYPE_CHECKING:
    from loom.runtime.constrained.dfa import ByteDFA
    from loom.runtime.constrained.token_walk import TokenTrie

SHARED_SCAN_BYTES = 64 << 20  # per vocabulary


class Scan(NamedTuple):
    """One lexer state's scan: ebnf_scan.lexeme_scan's answer and what it reported beside it."""

    dfa: ByteDFA  # (held: the key is its identity)
    inside: np.ndarray  # packed: the tokens that stay inside the lexeme
    splits: dict[int, np.ndarray]  # offset j -> packed: the tokens that may end it after j bytes
    ids: dict[int, tuple[np.ndarray, tuple[int, int]]]  # j -> (few tokens' ids, their address and count)
    bulk: dict[int, tuple[int, np.ndarray]]  # j -> (unsafe buckets, the tokens set in bulk)
    named: bytes | None  # where every row is listed: their content (offsets and ids), naming them
    listed: tuple[np.ndarray, np.ndarray, tuple[int, int, int]] | None  # there: every row's ids, their offsets
    # (ascending), and the addresses of both and their count (the rows crossed in one walk: ebnf_masks._cross_list)
    nbytes: int  # the packed masks' and the automaton's table (held: a large one counts in every entry)


class _Kept:
    def __init__(self, trie: TokenTrie) -> None:
        self.trie = trie
        self.scans: OrderedDict[tuple[int, int, int], Scan] = OrderedDict()
        self.nbytes = 0


_LOCK = threading.Lock()  # (scans run on the scheduler's thread and on compile workers)
_KEPT: dict[int, _Kept] = {}  # id(trie) -> its scans (a few vocabularies)


def _kept(trie: TokenTrie) -> _Kept:
    kept = _KEPT.get(id(trie))
    if kept is None or kept.trie is not trie:
        while len(_KEPT) >= 4:
            del _KEPT[next(iter(_KEPT))]
        kept = _KEPT[id(trie)] = _Kept(trie)
    return kept


def shared_scan(trie: TokenTrie, dfa: ByteDFA, state: int, offset: int) -> Scan | None:
    with _LOCK:
        kept = _kept(trie)
        found = kept.scans.get((id(dfa), state, offset))
        if found is not None:
            kept.scans.move_to_end((id(dfa), state, offset))
        return found


def keep_scan(
    trie: TokenTrie,
    dfa: ByteDFA,
    state: int,
    offset: int,
    scanned: tuple[np.ndarray, dict[int, np.ndarray]],
    ids: dict[int, tuple[np.ndarray, tuple[int, int]]],
    bulk: dict[int, tuple[int, np.ndarray]],
) -> Scan:
    inside, splits = scanned
    named = listed = None
    if splits and len(ids) == len(splits):  # every row listed: their content names them (ebnf_masks._cross_splits)
        listed = listed_rows({j: ids[j][0] for j in splits})
        named = listed[0].tobytes() + listed[1].tobytes()  # (their ids and offsets, of one length; joined per row it took ~2 ms)
    found = Scan(dfa, inside, splits, ids, bulk, named, listed, inside.nbytes * (1 + len(splits) + len(bulk)) + dfa.table.nbytes)
    with _LOCK:
        kept = _kept(trie)
        key = (id(dfa), state, offset)
        held = kept.scans.get(key)
        if held is not None:  # (another thread scanned it first: one answer for all)
            return held
        kept.scans[key] = found
        kept.nbytes += found.nbytes
        while kept.nbytes > SHARED_SCAN_BYTES and len(kept.scans) > 1:
            kept.nbytes -= kept.scans.popitem(last=False)[1].nbytes
    return found
