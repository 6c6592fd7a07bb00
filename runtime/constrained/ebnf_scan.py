"""The EBNF engine's lexer-state scan of the vocabulary (ebnf_masks' `scan`): a C walk of the token
trie against the terminal's DFA, taking whole subtrees of "safe" bytes from one cached mask.

    inside, splits = lexeme_scan(trie, vocab, table, accepting, state)   or None (no compiler)

A plain walk visits every live trie node: from a string's contents, that is the whole
vocabulary (~2 ms at 128k tokens) for every new lexer state, and a long string (a chunked
`maxLength`) has a new one at nearly every step. As token_walk.trie_mask does for regexes, the
byte groups that all lead the state to one live successor ("safe"), followed as long as each
successor does the same, give a run: a token of at most `run` safe bytes stays inside the lexeme.
Here the run also stops at the first accepting state, as a lexeme that may end inside a token puts
it in `splits` instead. The walk skips every subtree of safe bytes no deeper than the run, and
their tokens come from token_walk's cached mask of such tokens (a JSON string's contents: the same
in every schema). A scan entered mid-token (past the token's first `offset` bytes, which can be
anything) shares no walk above the offset: every token longer than it counts (0.5-1 ms of trie at
128k). There the tokens whose bytes past the offset are all safe are settled by vectorised passes
over the vocabulary (per token, where its last unsafe byte is: token_walk.last_unsafe_byte), and
only the few others are walked, one by one. A state with no run to skip (a key's, a bracket's)
is walked from the trie's nodes one below the offset whose byte it takes (the trie's index of its
nodes by depth and byte), not through every node above the offset (~50 us at 128k).

A state with too few safe bytes for the skip to pay is walked node by node (NO_SKIP). Each scan
writes its rows of `splits` into a per-thread scratch buffer and zeroes only the rows it hit:
zeroing a [max_depth + 1, width] buffer per scan cost more than a keyword's whole walk at 128k.
It also records which tokens it set in which row (up to PAIRS): crossing a row of a few hundred
tokens then costs per token, not per word of the vocabulary (ebnf_walk's loom_ebnf_cross_ids).

LOOM_NO_C_EBNF=1 turns it off (ebnf_masks scans with numpy instead).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import weakref

import numpy as np

from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.token_walk import ALL_BUCKETS, BUCKET_BIT, TokenTrie, last_unsafe_byte, safe_mask
from loom.runtime.constrained.vocabulary import TokenVocab, token_rows

_C_SOURCE = r"""
#include <stdint.h>
/* One lexeme's scan (a complete DFA) from `state`, entered after a token's first `offset` bytes
   (the trie's layout: token_walk's loom_trie_mask): sets in `inside` the tokens longer than offset
   whose every later byte keeps it live, and in row j of `splits` [max_depth + 1][width] the tokens
   longer than j whose bytes offset..j reach an accepting state (the lexeme may end inside them);
   hit[j] = 1 where row j got any. A subtree's tokens below node i are
   tok_ids[tok_off[i + 1] .. tok_off[node_skip[i]]).
   It skips the subtrees whose path and every byte past `offset` are
   safe and whose tokens are at most `run` bytes past it (safe[d]: the path to depth d is). Their
   tokens are the caller's to set (a cached mask of every such token, or of those whose bytes past
   the offset are all safe). Where a safe byte
   past the run kills the token (`end`: 1, or 2 when the run's last state accepts), a subtree of
   safe bytes is skipped however deep: its longer tokens are dead, or (2) cross the lexeme end. */
typedef struct {
    const uint8_t *node_byte; const int32_t *node_depth, *node_skip, *tok_off, *tok_ids;
    const int32_t *table; int32_t dead; const uint8_t *accepting; int32_t *stack;
    uint32_t *inside, *splits; int64_t width; uint8_t *hit;
    const uint64_t *node_sub; const int32_t *node_maxd; uint64_t unsafe; int32_t run;
    const uint8_t *safe_byte; uint8_t *safe; int32_t offset, end; int64_t *pairs, cap, *n_pairs;
} scan_t;

/* The nodes i .. stop of the preorder (whole subtrees), their parents' states on x->stack. */
static void scan_nodes(const scan_t *x, int64_t i, int64_t stop) {
    while (i < stop) {
        int32_t d = x->node_depth[i];
        if (d <= x->offset) { x->stack[d] = x->stack[d - 1]; x->safe[d] = 1; i++; continue; }  /* bytes before the lexeme */
        if (x->safe[d - 1] && !(x->node_sub[i] & x->unsafe) && (x->end || x->node_maxd[i] - x->offset <= x->run)) {
            i = x->node_skip[i];
            continue;
        }
        int32_t s = x->table[(int64_t)x->stack[d - 1] * 256 + x->node_byte[i]];
        if (s == x->dead) { i = x->node_skip[i]; continue; }
        x->stack[d] = s;
        x->safe[d] = x->safe[d - 1] & x->safe_byte[x->node_byte[i]];
        for (int32_t k = x->tok_off[i]; k < x->tok_off[i + 1]; k++) {
            int32_t t = x->tok_ids[k];
            x->inside[t >> 5] |= (uint32_t)1 << (t & 31);
        }
        int32_t below = x->tok_off[x->node_skip[i]];  /* the subtree's tokens end here */
        if (x->accepting[s] && x->tok_off[i + 1] < below) {
            uint32_t *row = x->splits + (int64_t)d * x->width;
            x->hit[d] = 1;
            for (int32_t k = x->tok_off[i + 1]; k < below; k++) {
                int32_t t = x->tok_ids[k];
                row[t >> 5] |= (uint32_t)1 << (t & 31);
                if (*x->n_pairs < x->cap) x->pairs[*x->n_pairs] = ((int64_t)d << 32) | t;  /* past cap: counted only */
                (*x->n_pairs)++;
            }
        }
        i++;
    }
}

void loom_ebnf_scan(const uint8_t *node_byte, const int32_t *node_depth, const int32_t *node_skip,
                    const int32_t *tok_off, const int32_t *tok_ids,
                    const int32_t *table, int32_t dead, const uint8_t *accepting, int32_t *stack,
                    uint32_t *inside, uint32_t *splits, int64_t width, uint8_t *hit,
                    const uint64_t *node_sub, const int32_t *node_maxd, uint64_t unsafe, int32_t run,
                    const uint8_t *safe_byte, uint8_t *safe, int32_t offset, int32_t end, int64_t *pairs,
                    int64_t cap, int64_t *n_pairs, const int32_t *starts, const int64_t *start_off) {
    scan_t x = {node_byte, node_depth, node_skip, tok_off, tok_ids, table, dead, accepting, stack, inside, splits,
                width, hit, node_sub, node_maxd, unsafe, run, safe_byte, safe, offset, end, pairs, cap, n_pairs};
    safe[0] = 1;
    /* only the subtrees below the nodes of depth offset + 1 whose byte the state takes
       (starts[start_off[b] .. start_off[b + 1]) for byte b, in preorder): entered mid-token, not
       every node above; at offset 0, not every child of the root */
    stack[offset] = stack[0];
    safe[offset] = 1;
    for (int b = 0; b < 256; b++) {
        if (table[(int64_t)stack[0] * 256 + b] == dead) continue;
        for (int64_t k = start_off[b]; k < start_off[b + 1]; k++)
            scan_nodes(&x, starts[k], node_skip[starts[k]]);
    }
}

/* The tokens ids[0..n) (rows[k]: token k's row of the padded byte matrix data [.., stride], lens by
   row) walked one by one from `state` past their first `offset` bytes: inside and splits as
   loom_ebnf_scan sets them (a scan entered mid-token, for the few tokens with unsafe bytes). */
void loom_ebnf_scan_each(const int64_t *ids, const int64_t *rows, int64_t n, const uint8_t *data, int64_t stride,
                         const int64_t *lens, const int32_t *table, int32_t dead, const uint8_t *accepting,
                         int32_t state, int32_t offset, uint32_t *inside, uint32_t *splits, int64_t width,
                         uint8_t *hit, int64_t *pairs, int64_t cap, int64_t *n_pairs) {
    for (int64_t k = 0; k < n; k++) {
        int64_t t = ids[k], len = lens[rows[k]], d = offset;
        const uint8_t *b = data + rows[k] * stride;
        uint32_t bit = (uint32_t)1 << (t & 31);
        int32_t s = state;
        for (; d < len; d++) {
            s = table[(int64_t)s * 256 + b[d]];
            if (s == dead) break;
            if (d + 1 < len && accepting[s]) {  /* the lexeme may end after byte d: the rest crosses */
                splits[(d + 1) * width + (t >> 5)] |= bit;
                hit[d + 1] = 1;
                if (*n_pairs < cap) pairs[*n_pairs] = ((d + 1) << 32) | t;
                (*n_pairs)++;
            }
        }
        if (d == len) inside[t >> 5] |= bit;
    }
}
"""

_MIN_RUN = 4  # a shorter run skips too little to pay for its mask: the plain walk instead
_MIN_SAFE_BYTES = 32  # so do fewer safe bytes (a keyword's, a number's): their subtrees are small
OPEN, DEAD, ENDS = 0, 1, 2  # what a safe byte past the run does (safe_run)
NO_SKIP = (ALL_BUCKETS, 0, OPEN)  # a run that skips nothing: the plain walk of every live node
_FEW_PAIRS = 32  # at most this many: a scan's rows of ids are grouped in Python
PAIRS = 8192  # (row, token) pairs a scan records for its split rows' ids (more: the rows stay words only)
_LOCAL = threading.local()


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_NO_C_EBNF"):
        return None
    lib = compile_c(_C_SOURCE, "loom_ebnf_scan", "the EBNF lexer-state scan")
    if lib is None:
        return None
    lib.loom_ebnf_scan.restype = None
    lib.loom_ebnf_scan.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_void_p, ctypes.c_int32]
    lib.loom_ebnf_scan.argtypes += [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_void_p]
    lib.loom_ebnf_scan.argtypes += [ctypes.c_void_p] * 2 + [ctypes.c_uint64, ctypes.c_int32] + [ctypes.c_void_p] * 2
    lib.loom_ebnf_scan.argtypes += [ctypes.c_int32, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.loom_ebnf_scan.argtypes += [ctypes.c_void_p, ctypes.c_void_p]
    lib.loom_ebnf_scan_each.restype = None
    lib.loom_ebnf_scan_each.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.loom_ebnf_scan_each.argtypes += [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32]
    lib.loom_ebnf_scan_each.argtypes += [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.loom_ebnf_scan_each.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return lib


def available() -> bool:
    return _library() is not None


def safe_run(table: np.ndarray, accepting: np.ndarray, state: int, max_depth: int) -> tuple[int, int, int]:
    """(unsafe byte buckets, run, end) from `state` of a complete byte DFA (`table` [S + 1, 256],
    dead last): the groups that all lead it to one live successor, and how many bytes of them in a
    row keep a token inside the lexeme (each successor leading them all to one live state, none of
    the states before the last accepting; max_depth once a non-accepting one loops; 0 where fewer
    than _MIN_SAFE_BYTES bytes are safe). `end` says what a further safe byte does: OPEN (unknown:
    walked), DEAD (kills the token: a counted run ends), or ENDS (the run's last state accepts and
    a further byte kills: the lexeme ends there)."""
    return safe_runs(table, accepting, state, max_depth)[0][1]


def safe_runs(table: np.ndarray, accepting: np.ndarray, state: int, max_depth: int) -> list[tuple[int, tuple[int, int, int]]]:
    """[(state, safe_run's answer)] for `state` first, then for each state its run goes through: the
    same safe bytes lead each to the next, so each one's run is what is left of it. A counted run
    (a chunk of `maxLength`) is followed once, not again from each of its states."""
    dead = table.shape[0] - 1
    nexts = table[state]  # [256]
    live = nexts[nexts != dead]
    if len(live) < _MIN_SAFE_BYTES:  # (a safe byte leads to the live target: too few live ones, too few safe; a
        return [(state, (ALL_BUCKETS, 0, OPEN))]  # key's or a bracket's state, answered without np.unique's ~10 us)
    targets, counts = np.unique(live, return_counts=True)
    target = int(targets[counts.argmax()])
    unsafe = int(np.bitwise_or.reduce(BUCKET_BIT[nexts != target]))
    if unsafe == ALL_BUCKETS:
        return [(state, (unsafe, 0, OPEN))]
    columns = np.flatnonzero((BUCKET_BIT & np.uint64(unsafe)) == 0)  # the safe bytes
    if len(columns) < _MIN_SAFE_BYTES:
        return [(state, (unsafe, 0, OPEN))]
    chain = [state]  # chain[i]: the state after i safe bytes; target: after len(chain)
    end = OPEN
    while len(chain) <= max_depth:  # no token is longer: a run of max_depth skips every safe subtree
        following = table[target, columns]
        nxt = int(following[0])
        uniform = not (following != nxt).any()
        if accepting[target]:  # a longer token may end the lexeme here
            end = ENDS if nxt == dead and uniform else OPEN
            break
        if target == chain[-1]:  # it loops: every token of safe bytes stays inside
            return [(q, (unsafe, max_depth, OPEN)) for q in chain]
        if nxt == dead and uniform:
            end = DEAD
            break
        if nxt == dead or not uniform:
            break
        chain.append(target)
        target = nxt
    run = len(chain)
    return [(q, (unsafe, run - i, end)) for i, q in enumerate(chain)]


def _scratch(trie: TokenTrie) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """This thread's buffers for `trie`'s scans ((splits [max_depth + 1, width], hit, stack, safe,
    pairs, count), and the data addresses of the first five): the split rows all zero between scans
    (a scan zeroes the rows it hit). Scans run on the scheduler's thread and on compile workers
    (each compile's first mask), so each thread has its own."""
    held = getattr(_LOCAL, "buffers", None)
    if held is None or held[0] is not trie or len(held[1][4]) < PAIRS:
        depth = trie.max_depth + 1
        buffers = (np.zeros((depth, trie.width), dtype=np.uint32), np.zeros(depth, dtype=np.uint8), np.zeros(depth, dtype=np.int32),
                   np.zeros(depth, dtype=np.uint8), np.zeros(PAIRS, dtype=np.int64), np.zeros(1, dtype=np.int64))  # fmt: skip
        held = _LOCAL.buffers = (trie, buffers, tuple(b.ctypes.data for b in buffers))
    return held[1], held[2]


def _addresses(table: np.ndarray, accepting: np.ndarray, unsafe: int) -> tuple[int, int, int]:
    """(table, accepting as bytes, the unsafe buckets' safe bytes): data addresses, kept per
    automaton and bucket set (taking one costs ~2 us; a key's scan is ~30 us of C)."""
    held = _ADDRESSES.get(id(table))
    if held is None or held[0]() is not table:  # (held weakly: a grammar's automata go with it)
        if len(_ADDRESSES) >= 1024:
            _ADDRESSES.clear()
        acc = np.ascontiguousarray(accepting, dtype=np.uint8)
        held = _ADDRESSES[id(table)] = (weakref.ref(table), acc, table.ctypes.data, acc.ctypes.data)
    safe = _SAFE_BYTES.get(unsafe)
    if safe is None:
        if len(_SAFE_BYTES) >= 1024:
            _SAFE_BYTES.clear()
        array = ((BUCKET_BIT & np.uint64(unsafe)) == 0).view(np.uint8)
        safe = _SAFE_BYTES[unsafe] = (array, array.ctypes.data)
    return held[2], held[3], safe[1]


_ADDRESSES: dict[int, tuple[weakref.ref, np.ndarray, int, int]] = {}
_SAFE_BYTES: dict[int, tuple[np.ndarray, int]] = {}


def lexeme_scan(
    trie: TokenTrie,
    vocab: TokenVocab,
    table: np.ndarray,
    accepting: np.ndarray,
    state: int,
    offset: int = 0,
    run: tuple[int, int, int] | None = None,
    ids_out: dict[int, tuple[np.ndarray, tuple[int, int]]] | None = None,
    dense_out: dict[int, tuple[int, np.ndarray]] | None = None,
) -> tuple[np.ndarray, dict[int, np.ndarray]] | None:
    """A lexeme's scan from `state` of a complete byte DFA (`table` [S + 1, 256] int32, dead last,
    `accepting` [S + 1] bool), entered after each token's first `offset` bytes: (packed words of
    the tokens longer than `offset` whose later bytes stay inside the lexeme, {j: packed words of
    the tokens longer than j that may end it after their first j bytes}); None where the scan is
    not compiled. `trie` is `vocab`'s. `run`: safe_run's answer for the state, where the caller
    keeps it (it costs ~50 us); NO_SKIP walks every live node. `ids_out` gets, for the split rows
    of few tokens (PAIRS in all), their token ids (int64, in the trie's order) and (their address, count): crossing
    them costs per token.
    `dense_out` gets, for the split row set in bulk (the tokens whose bytes past the offset are all
    safe and outlast the run), (the unsafe buckets, packed words of those tokens): its other tokens
    were walked."""
    lib = _library()
    if lib is None:
        return None
    assert table.dtype == np.int32 and table.flags.c_contiguous and table.shape[1] == 256, "the scan reads raw byte tables"
    unsafe, length, end = safe_run(table, accepting, state, trie.max_depth) if run is None else run
    if length == 0 or (end == OPEN and length < _MIN_RUN):  # too few safe bytes to pay: every node walked
        unsafe, length, end = NO_SKIP
    (splits, hit, stack, safe, pairs, count), at = _scratch(trie)
    count[0] = 0  # the (depth, token) pairs the C side set in split rows
    recorded = (at[4], min(PAIRS, len(pairs)), at[5])
    at_table, at_acc, at_safe_byte = _addresses(table, accepting, unsafe)
    dense, bulk = -1, None  # the split row set in bulk here (its tokens are not in `pairs`), and what was set
    try:
        if offset and length:
            inside, dense, bulk = _mid_token(lib, trie, vocab, table, at_acc, state, offset, unsafe, length, end, splits, hit, recorded)
        else:
            if offset or length == 0:
                inside = np.zeros(trie.width, dtype=np.uint32)
            else:  # the skipped tokens at once: those of at most `length` safe bytes; longer ones end the lexeme
                inside = safe_mask(trie, unsafe, length).copy()
                if end == ENDS and length <= trie.max_depth:
                    bulk = safe_mask(trie, unsafe, trie.max_depth) & ~inside
                    splits[length] = bulk
                    hit[length], dense = bulk.any(), length
            stack[0] = state
            starts = (trie.start_pointers[0], trie.start_pointers[1] + 8 * 256 * (offset + 1))  # (the live first bytes' nodes only)
            lib.loom_ebnf_scan(*trie.pointers, at_table, table.shape[0] - 1, at_acc, at[2],
                               inside.ctypes.data, at[0], trie.width, at[1], *trie.sub_pointers, unsafe, length,
                               at_safe_byte, at[3], offset, end, *recorded, *starts)  # fmt: skip
    except BaseException:  # (a compile stopped mid-scan) the next scan must find the buffer zeroed
        splits[:], hit[:] = 0, 0
        raise
    n = int(count[0])  # (past recorded[1], the pairs were counted, not all recorded: no ids)
    if not n and dense < 0:  # no token ends the lexeme (a key's name, a bracket's whitespace): no row was hit
        return inside, {}
    rows = np.flatnonzero(hit)
    block = splits[rows]  # one copy of the rows hit
    out = dict(zip(rows.tolist(), block))
    if dense_out is not None and dense in out:
        dense_out[dense] = (unsafe, bulk)
    splits[rows], hit[rows] = 0, 0
    if ids_out is not None and n <= min(_FEW_PAIRS, recorded[1]):  # (a key's, a bracket's: grouped in Python, a third of the numpy below's cost)
        by_row: dict[int, list[int]] = {}
        for key in pairs[:n].tolist():
            by_row.setdefault(key >> 32, []).append(key & 0xFFFFFFFF)
        for j, listed in by_row.items():
            if j != dense:
                tokens = np.array(listed, dtype=np.int64)
                ids_out[j] = (tokens, (tokens.ctypes.data, len(tokens)))
    elif ids_out is not None and n <= recorded[1]:
        keys = pairs[:n]
        depth = (keys >> 32).astype(np.uint8 if trie.max_depth < 256 else np.uint16)  # sorted by radix
        keys = keys[np.argsort(depth, kind="stable")]  # by row, each in the walk's order (the trie's)
        depth, tokens = keys >> 32, keys & 0xFFFFFFFF
        bounds = np.searchsorted(depth, np.concatenate([rows, rows + 1]))
        at = tokens.ctypes.data
        for j, lo, hi in zip(rows.tolist(), bounds[: len(rows)].tolist(), bounds[len(rows) :].tolist()):
            if j != dense:
                ids_out[j] = (tokens[lo:hi], (at + 8 * lo, hi - lo))
    return inside, out


def _mid_token(
    lib: ctypes.CDLL,
    trie: TokenTrie,
    vocab: TokenVocab,
    table: np.ndarray,
    at_acc: int,
    state: int,
    offset: int,
    unsafe: int,
    length: int,
    end: int,
    splits: np.ndarray,
    hit: np.ndarray,
    recorded: tuple[int, int, int],
) -> tuple[np.ndarray, int, np.ndarray | None]:
    """A skipping scan entered `offset` bytes into the tokens (-> inside, the split row set in bulk
    (-1: none), the tokens set in it in bulk; splits and hit filled).
    Every token longer than the offset counts, and the trie shares nothing above the offset, so
    instead of walking it: the tokens whose bytes past the offset are all safe are settled at once
    (stay inside up to the run; past it, cross the lexeme's end (ENDS) or die (DEAD)), and the
    rest, the few with an unsafe byte past the offset, are walked one by one."""
    past = trie.tok_len - offset  # [V] bytes past the offset (<= 0: none; tokens not in the trie: > 0)
    listed = (past > 0) & (trie.tok_len <= trie.max_depth)
    tail = (last_unsafe_byte(trie, unsafe) <= offset) & listed  # every byte past the offset safe
    inside = np.packbits(tail & (past <= length), bitorder="little").view(np.uint32)
    dense, bulk = -1, None
    if end == ENDS and offset + length <= trie.max_depth:  # longer ones cross the lexeme's end after the run
        dense = offset + length
        bulk = np.packbits(tail & (past > length), bitorder="little").view(np.uint32)
        splits[dense] |= bulk
        hit[dense] |= splits[dense].any()
    settled = tail if end != OPEN else tail & (past <= length)
    ids = np.flatnonzero(listed & ~settled)
    rows = token_rows(vocab)[ids]
    data = np.ascontiguousarray(vocab.data)
    lib.loom_ebnf_scan_each(ids.ctypes.data, rows.ctypes.data, len(ids), data.ctypes.data, data.shape[1],
                            vocab.lens.ctypes.data, table.ctypes.data, table.shape[0] - 1, at_acc, state, offset,
                            inside.ctypes.data, splits.ctypes.data, trie.width, hit.ctypes.data, *recorded)  # fmt: skip
    return inside, dense, bulk
