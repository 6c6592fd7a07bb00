"""Token masks by a walk of the vocabulary's byte trie against a DFA, in C when a compiler is at hand.

    trie = token_trie(vocab)                       once per vocabulary (cached; numpy arrays)
    words = trie_mask(trie, table, byte_class, dead, state)   packed words [ceil(V / 32)] uint32, or None

A token is allowed from `state` iff its bytes lead the DFA to a live state (the DFA's dead state is
the only one that cannot reach acceptance). The trie shares prefixes, and a dead prefix skips its
whole subtree, so a walk does one table lookup per live trie node: ~0.1 ms for a string state at
49k tokens, where the vectorised numpy scan (regex_dfa._scan) took 0.3-1.5 ms and 4-16 ms at 128k.
Live nodes are still most of the trie from a string's contents, so the walk also skips subtrees of
"safe" bytes (those the state loops on, or follows as a counted run): their tokens come from one
mask per vocabulary and byte-group set (`safe_mask`; per trie node, `node_sub` says which of 64
byte groups its subtree holds). A string state at 128k: 1.7 -> 0.45 ms. Inside a string every
well-formed UTF-8 character loops too, so there the multi-byte tokens count as safe unless their
bytes are not well-formed UTF-8 (a flag in `node_sub`, as if a group): half of what such a walk
visited at 128k.

The C source below is compiled once per machine (native_c.compile_c); where there is no
compiler, `trie_mask` returns None and callers use their numpy scan.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import functools
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from loom.runtime.constrained.bitmask import bitmask_width
from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.vocabulary import TokenVocab

if TYPE_CHECKING:
    from loom.runtime.constrained.lazy_dfa import SubsetDFA

_C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
/* A lazy DFA's C step (lazy_dfa / subset_native): builds state q's row, -> the state count (< 0: failed). */
typedef int32_t (*step_fn)(void *builder, int32_t q, int32_t *table, uint8_t *accepting, uint8_t *expanded);

/* Preorder trie: node i has byte node_byte[i] at depth node_depth[i] (1-based); node_skip[i] is the
   first node after its subtree; tokens ending at node i are tok_ids[tok_off[i] .. tok_off[i + 1]).
   Walks from node *pos with the DFA states of the path so far in stack[]. A row not built yet
   (UNKNOWN: -1) is built by `step` where one is given and the table has room for its new states
   (*n_states + n_cls <= capacity). Returns -1 when done, -2 when the step failed, or a state whose
   row it could not build, with *pos at the node to resume from once it is. */
int32_t loom_trie_mask(const uint8_t *node_byte, const int32_t *node_depth, const int32_t *node_skip,
                       const int32_t *tok_off, const int32_t *tok_ids, int64_t n_nodes,
                       int32_t *table, int64_t n_cls, const int64_t *byte_class, int32_t dead,
                       int32_t *stack, uint32_t *out, int64_t *pos,
                       const uint64_t *node_sub, const int32_t *node_maxd, uint64_t unsafe, int32_t run,
                       const uint8_t *safe_byte, uint8_t *safe, step_fn step, void *builder, uint8_t *accepting,
                       uint8_t *expanded, int64_t *n_states, int64_t capacity) {
    /* safe[d]: the path to depth d is all safe bytes (each keeps the walk alive for `run` bytes).
       Below such a path, a subtree with no unsafe bucket and no token longer than `run` holds only
       tokens of the caller's safe mask: skipped. */
    int64_t i = *pos;
    while (i < n_nodes) {
        int32_t d = node_depth[i];
        if (safe[d - 1] && !(node_sub[i] & unsafe) && node_maxd[i] <= run) { i = node_skip[i]; continue; }
        int32_t s = table[(int64_t)stack[d - 1] * n_cls + byte_class[node_byte[i]]];
        if (s == dead) { i = node_skip[i]; continue; }
        if (s < 0) {
            if (!step || *n_states + n_cls > capacity) { *pos = i; return stack[d - 1]; }
            int32_t n = step(builder, stack[d - 1], table, accepting, expanded);
            if (n < 0) { *pos = i; return -2; }
            *n_states = n;
            continue;  /* node i again, its parent's row built */
        }
        stack[d] = s;
        safe[d] = safe[d - 1] & safe_byte[node_byte[i]];
        for (int32_t k = tok_off[i]; k < tok_off[i + 1]; k++) {
            int32_t t = tok_ids[k];
            out[t >> 5] |= (uint32_t)1 << (t & 31);
        }
        i++;
    }
    *pos = i;
    return -1;
}

/* Whether every well-formed UTF-8 character leads `state` back to itself (its intermediate states
   all live): 0 when so, 1 when so but for the C1 controls (U+0080-U+009F, C2 80-9F), which all
   kill it (a JSON string that leaves them out), -1 when neither, -2 when it cannot yet tell: the
   states whose rows are not built yet are added to `pending` (see loom_safe_run), all of a level
   at once. The first sequence is the C1 controls'. */
static const uint8_t UTF8_SEQS[10][4][2] = {
    {{0xC2, 0xC2}, {0x80, 0x9F}}, {{0xC2, 0xC2}, {0xA0, 0xBF}}, {{0xC3, 0xDF}, {0x80, 0xBF}},
    {{0xE0, 0xE0}, {0xA0, 0xBF}, {0x80, 0xBF}}, {{0xE1, 0xEC}, {0x80, 0xBF}, {0x80, 0xBF}},
    {{0xED, 0xED}, {0x80, 0x9F}, {0x80, 0xBF}}, {{0xEE, 0xEF}, {0x80, 0xBF}, {0x80, 0xBF}},
    {{0xF0, 0xF0}, {0x90, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}}, {{0xF1, 0xF3}, {0x80, 0xBF}, {0x80, 0xBF}, {0x80, 0xBF}},
    {{0xF4, 0xF4}, {0x80, 0x8F}, {0x80, 0xBF}, {0x80, 0xBF}}};
static const int UTF8_LEN[10] = {2, 2, 2, 3, 3, 3, 3, 4, 4, 4};
#define PENDING 64

static int add_pending(int32_t *pending, int32_t q) {  /* pending[0] states in pending[1..]; 0 when full */
    for (int k = 1; k <= pending[0]; k++)
        if (pending[k] == q) return 1;
    if (pending[0] == PENDING) return 0;
    pending[++pending[0]] = q;
    return 1;
}

/* The rows a search reads: built by the lazy DFA's C step where one is given and the table has
   room (as loom_trie_mask builds them), else listed in `pending` for the caller. */
typedef struct {
    int32_t *table; int64_t n_cls; step_fn step; void *builder; uint8_t *accepting, *expanded;
    int64_t *n_states, capacity; int32_t *pending; int failed;
} rows_t;

static const int32_t *row_of(rows_t *r, int32_t q) {  /* NULL: not built (pending, or r->failed) */
    int32_t *row = r->table + (int64_t)q * r->n_cls;
    if (row[0] >= 0) return row;
    if (r->step && *r->n_states + r->n_cls <= r->capacity) {
        int32_t n = r->step(r->builder, q, r->table, r->accepting, r->expanded);
        if (n >= 0) { *r->n_states = n; return row; }
        r->failed = 1;
        return NULL;
    }
    if (!add_pending(r->pending, q)) r->failed = 1;
    return NULL;
}

static int64_t utf8_loops(rows_t *r, const int64_t *byte_class, int32_t dead, int32_t state) {
    int32_t cur[16], next[16];
    int64_t answer = 0;
    for (int k = 0; k < 10; k++) {
        int n_cur = 1, n_dead = 0, partial = 0;
        cur[0] = state;
        for (int j = 0; j < UTF8_LEN[k]; j++) {
            int n_next = 0;
            for (int c = 0; c < n_cur; c++) {
                const int32_t *row = row_of(r, cur[c]);
                if (!row) {  /* this branch waits for the row */
                    if (r->failed) return -1;
                    partial = 1;
                    continue;
                }
                for (int b = UTF8_SEQS[k][j][0]; b <= UTF8_SEQS[k][j][1]; b++) {
                    int32_t s = row[byte_class[b]];
                    if (s == dead || s < 0) { n_dead++; continue; }
                    int m = 0;
                    while (m < n_next && next[m] != s) m++;
                    if (m == n_next) {
                        if (n_next == 16) return -1;  /* (not a character class's few states) */
                        next[n_next++] = s;
                    }
                }
            }
            for (int c = 0; c < n_next; c++) cur[c] = next[c];
            n_cur = n_next;
        }
        if (partial) continue;
        if (k == 0 && n_cur == 0 && n_dead == 32) { answer = 1; continue; }  /* C2 live, each C1 control dead */
        if (n_dead || n_cur != 1 || cur[0] != state) return -1;
    }
    return r->pending[0] ? -2 : answer;
}

#define RUN_ENDS_DEAD (1 << 30)

/* _safe_run's search (see there) from `state`: the run of safe bytes (>= 0; RUN_ENDS_DEAD set where
   a further safe byte kills), with their unsafe
   buckets in *unsafe_out, or -1 where it needs rows it could not build: their states are in
   pending[1 .. pending[0]] (the caller builds them and calls again), -2 where the step failed.
   The target is the live successor most bytes lead to (the smallest among ties). */
int64_t loom_safe_run(int32_t *table, int64_t n_cls, const int64_t *byte_class, int32_t dead, int32_t state,
                      const uint64_t *bucket_bit, uint64_t all_buckets, int32_t min_live, int32_t cap,
                      int32_t max_depth, uint64_t hi_buckets, uint64_t ill_formed, uint64_t c1_control,
                      uint64_t *unsafe_out, int32_t *pending, step_fn step, void *builder, uint8_t *accepting,
                      uint8_t *expanded, int64_t *n_states, int64_t capacity) {
    rows_t r = {table, n_cls, step, builder, accepting, expanded, n_states, capacity, pending, 0};
    *unsafe_out = all_buckets;
    pending[0] = 0;
    if (state == dead) return 0;
    const int32_t *row = row_of(&r, state);
    if (!row) return r.failed && !pending[0] ? -2 : -1;
    int32_t nexts[256], targets[256], counts[256];
    int n_targets = 0, live = 0;
    for (int b = 0; b < 256; b++) {
        int32_t s = row[byte_class[b]];
        nexts[b] = s;
        if (s == dead) continue;
        live++;
        int k = 0;
        while (k < n_targets && targets[k] != s) k++;
        if (k == n_targets) { targets[k] = s; counts[k] = 0; n_targets++; }
        counts[k]++;
    }
    if (live < min_live) return 0;
    int best = 0;
    for (int k = 1; k < n_targets; k++)
        if (counts[k] > counts[best] || (counts[k] == counts[best] && targets[k] < targets[best])) best = k;
    int32_t target = targets[best];
    uint64_t unsafe = 0;
    for (int b = 0; b < 256; b++)
        if (nexts[b] != target) unsafe |= bucket_bit[b];
    *unsafe_out = unsafe;
    if (unsafe == all_buckets) return 0;
    int64_t cols[256];
    int n_cols = 0;
    for (int b = 0; b < 256; b++)
        if (!(bucket_bit[b] & unsafe)) cols[n_cols++] = byte_class[b];
    int32_t run = 1, cur = state;
    while (run < cap) {
        if (target == cur) {  /* it loops: and every well-formed UTF-8 character may loop it too? */
            if (cur == state && (unsafe & hi_buckets)) {
                int64_t q = utf8_loops(&r, byte_class, dead, state);
                if (q == -2) return -1;
                if (q >= 0) *unsafe_out = (unsafe & ~hi_buckets) | ill_formed | (q ? c1_control : 0);
            }
            return max_depth;
        }
        cur = target;
        const int32_t *next_row = row_of(&r, target);
        if (!next_row) return r.failed && !pending[0] ? -2 : -1;
        int32_t following = next_row[cols[0]];
        int uniform = 1;
        for (int k = 1; k < n_cols && uniform; k++) uniform = next_row[cols[k]] == following;
        if (uniform && following == dead) return run | RUN_ENDS_DEAD;  /* a further safe byte kills: a count's end */
        if (!uniform || following < 0) break;
        target = following;
        run++;
    }
    return run;
}

"""


def _byte_buckets() -> np.ndarray:
    """[256] uint8: the 64 groups of bytes a subtree's summary records (node_sub). The groups follow
    the sets that DFA states loop on: every ASCII punctuation mark alone (quotes, backslash, braces),
    digits, hex and other letters by case, each whitespace byte, controls, and UTF-8 byte kinds."""
    out = np.zeros(256, dtype=np.uint8)
    groups = [range(0x30, 0x3A), range(0x61, 0x67), range(0x67, 0x7B), range(0x41, 0x47), range(0x47, 0x5B),
              [0x20], [0x09], [0x0A], [0x0D], [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F],
              range(0x80, 0xA0), range(0xA0, 0xC0), range(0xC0, 0xE0), range(0xE0, 0xF0), range(0xF0, 0x100)]  # fmt: skip
    groups += [[b] for b in b"!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"]
    assert len(groups) <= 64
    for g, members in enumerate(groups):
        out[list(members)] = g
    return out


_BUCKET = _byte_buckets()
BUCKET_BIT = np.left_shift(np.uint64(1), _BUCKET.astype(np.uint64))  # [256] uint64
ALL_BUCKETS = int(np.bitwise_or.reduce(BUCKET_BIT))  # every group some byte is in
HI_BUCKETS = int(np.bitwise_or.reduce(BUCKET_BIT[0x80:]))  # the groups of the bytes of UTF-8's multi-byte characters
# Not a byte's group: in node_sub, the subtree holds a path that is not a well-formed UTF-8 prefix
# (bytes from a character boundary: complete characters, maybe the start of one more); in tok_buckets,
# the token's bytes are not one. A state every such character loops on (a JSON string's contents)
# counts this bit unsafe instead of the bytes' groups, so its walk skips the multi-byte tokens too.
ILL_FORMED = 1 << 63
C1_CONTROL = 1 << 62  # nor this: the path holds a C1 control character (U+0080-U+009F), which outlines' JSON strings leave out
_BUCKET_BIT_ADDRESS = BUCKET_BIT.ctypes.data


def _utf8_step() -> np.ndarray:
    """[10, 256] uint8: UTF-8's well-formed byte sequences as an automaton (0: a character boundary;
    1-7 and _UTF8_AFTER_C2: inside a character, by the bytes it still takes; _UTF8_ILL: not
    well-formed, for good)."""
    step = np.full((10, 256), _UTF8_ILL, dtype=np.uint8)
    step[0, :0x80] = 0
    step[_UTF8_AFTER_C2, 0x80:0xC0] = 0
    for lo, hi, to in [(0xC2, 0xC2, _UTF8_AFTER_C2), (0xC3, 0xDF, 1), (0xE0, 0xE0, 3), (0xE1, 0xEC, 2), (0xED, 0xED, 4),
                       (0xEE, 0xEF, 2), (0xF0, 0xF0, 5), (0xF1, 0xF3, 6), (0xF4, 0xF4, 7)]:  # fmt: skip
        step[0, lo : hi + 1] = to
    for q, lo, hi, to in [(1, 0x80, 0xBF, 0), (2, 0x80, 0xBF, 1), (3, 0xA0, 0xBF, 1), (4, 0x80, 0x9F, 1), (5, 0x90, 0xBF, 2),
                          (6, 0x80, 0xBF, 2), (7, 0x80, 0x8F, 2)]:  # fmt: skip
        step[q, lo : hi + 1] = to
    return step


_UTF8_ILL, _UTF8_AFTER_C2 = 8, 9
_UTF8_STEP = _utf8_step()
_LAST_UNSAFE_KEPT = 8  # per trie: last_unsafe_byte's arrays and safe_mask's token lists, by unsafe bucket set (0.5 MB each at 128k)
_SAFE_MASKS_KEPT = 512  # per trie: the packed masks of "every byte safe" tokens, by safe bucket set and run (8 MB at 128k)


@dataclass(frozen=True, slots=True)
class TokenTrie:
    """The vocabulary's token bytes as a preorder trie (see _C_SOURCE for the layout)."""

    node_byte: np.ndarray  # [N] uint8
    node_depth: np.ndarray  # [N] int32, 1-based
    node_skip: np.ndarray  # [N] int32
    tok_off: np.ndarray  # [N + 1] int32
    tok_ids: np.ndarray  # [T] int32
    max_depth: int
    width: int  # packed words per mask
    node_sub: np.ndarray  # [N] uint64: the byte buckets (_BUCKET) of the node and its whole subtree, and ILL_FORMED / C1_CONTROL
    node_maxd: np.ndarray  # [N] int32: the depth of the deepest node of its subtree
    tok_buckets: np.ndarray  # [V] uint64: each token's byte buckets and flags (all bits: not in the trie)
    tok_len: np.ndarray  # [V] int32: each token's length (past max_depth: not in the trie)
    by_len: np.ndarray  # [T] the trie's token ids by length (ties in trie order)
    len_off: np.ndarray  # [max_depth + 2] tokens of length r are by_len[len_off[r] : len_off[r + 1]]
    node_parent: np.ndarray  # [N] int64 (-1: a root's child)
    levels: tuple[np.ndarray, ...]  # the nodes of depth 2, 3, ... (parents before children)
    tok_node: np.ndarray  # [T] the node each of tok_ids ends at
    by_depth_byte: np.ndarray  # [N] int32: the nodes by (depth, byte), in preorder within (a scan's start nodes)
    depth_byte_off: np.ndarray  # [(max_depth + 2) * 256 + 1] int64: those of depth d and byte b from d * 256 + b
    len_masks: np.ndarray  # [max_depth + 1, width] uint32, read-only: row r packs the tokens of at most r bytes (safe_mask)
    safe_masks: dict[tuple[int, int], np.ndarray] = dataclasses.field(default_factory=dict)  # (unsafe, run) -> packed
    last_unsafe: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)  # unsafe -> [V] (see last_unsafe_byte)
    safe_listed: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = dataclasses.field(default_factory=dict)  # unsafe -> safe_mask's
    # (the tokens without an unsafe byte, by length; where each length starts among them; the runs cached)
    # The five arrays' data addresses, taken once: `a.ctypes.data` costs ~2 us, and a walk over a
    # lazy DFA is resumed after every state it builds (a fifth of decode-time mask work was those).
    pointers: tuple[int, ...] = dataclasses.field(init=False)
    sub_pointers: tuple[int, int] = dataclasses.field(init=False)  # node_sub's and node_maxd's
    start_pointers: tuple[int, int] = dataclasses.field(init=False)  # by_depth_byte's and depth_byte_off's

    def __post_init__(self) -> None:
        arrays = (self.node_byte, self.node_depth, self.node_skip, self.tok_off, self.tok_ids)
        object.__setattr__(self, "pointers", tuple(a.ctypes.data for a in arrays))
        object.__setattr__(self, "sub_pointers", (self.node_sub.ctypes.data, self.node_maxd.ctypes.data))
        object.__setattr__(self, "start_pointers", (self.by_depth_byte.ctypes.data, self.depth_byte_off.ctypes.data))


def _build_trie(vocab: TokenVocab) -> TokenTrie:
    items = sorted((b, i) for i, b in vocab.by_id.items())
    node_byte: list[int] = []
    node_depth: list[int] = []
    ends: list[list[int]] = []
    prev = b""
    for data, tid in items:
        common = 0
        limit = min(len(prev), len(data))
        while common < limit and prev[common] == data[common]:
            common += 1
        if common == len(data) and len(prev) == len(data) and ends:  # the same bytes as the previous token
            ends[-1].append(tid)
            continue
        for depth in range(common + 1, len(data) + 1):
            node_byte.append(data[depth - 1])
            node_depth.append(depth)
            ends.append([])
        ends[-1].append(tid)
        prev = data
    depth = np.asarray(node_depth, dtype=np.int32)
    n = len(depth)
    skip = np.full(n, n, dtype=np.int32)
    parent = np.full(n, -1, dtype=np.int64)
    open_nodes: list[int] = []  # ancestors of the current node, by depth
    for i in range(n):
        d = node_depth[i]
        while len(open_nodes) >= d:  # every open node at depth >= d ends before i
            skip[open_nodes.pop()] = i
        if open_nodes:
            parent[i] = open_nodes[-1]
        open_nodes.append(i)
    off = np.zeros(n + 1, dtype=np.int32)
    off[1:] = np.cumsum([len(e) for e in ends])
    ids = np.asarray([t for e in ends for t in e], dtype=np.int32)
    byte = np.asarray(node_byte, dtype=np.uint8)
    levels = [np.flatnonzero((depth == d) & (parent >= 0)) for d in range(2, int(depth.max()) + 1)] if n else []
    utf8 = _UTF8_STEP[0, byte]  # [N] each node's path's UTF-8 state (_UTF8_STEP)
    c1 = np.zeros(n, dtype=bool)  # [N] the node's byte ends a C1 control character
    for idx in levels:  # parents before children
        above = utf8[parent[idx]]
        utf8[idx] = _UTF8_STEP[above, byte[idx]]
        c1[idx] = (above == _UTF8_AFTER_C2) & (byte[idx] < 0xA0)
    node_sub = BUCKET_BIT[byte] | np.where(utf8 == _UTF8_ILL, np.uint64(ILL_FORMED), np.uint64(0))  # [N] uint64
    node_sub |= np.where(c1, np.uint64(C1_CONTROL), np.uint64(0))
    path = node_sub.copy()
    for idx in levels:  # parents before children: each node's path buckets
        path[idx] |= path[parent[idx]]
    maxd = depth.copy()
    for idx in reversed(levels):  # children before parents: each subtree's buckets and depth
        np.bitwise_or.at(node_sub, parent[idx], node_sub[idx])
        np.maximum.at(maxd, parent[idx], maxd[idx])
    width, max_depth = bitmask_width(vocab.vocab_size), int(depth.max()) if n else 0
    tok_buckets = np.full(width * 32, np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    tok_len = np.full(width * 32, max_depth + 1, dtype=np.int32)
    at = np.repeat(np.arange(n), np.diff(off))  # each listed token's node
    tok_buckets[ids], tok_len[ids] = path[at], depth[at]
    by_len = ids[np.argsort(depth[at], kind="stable")]
    len_off = np.searchsorted(tok_len[by_len], np.arange(max_depth + 2)).astype(np.int64)
    key = depth.astype(np.int64) * 256 + byte
    by_depth_byte = np.argsort(key, kind="stable").astype(np.int32)
    depth_byte_off = np.searchsorted(key[by_depth_byte], np.arange((max_depth + 2) * 256 + 1)).astype(np.int64)
    len_masks = np.zeros((max_depth + 1, width), dtype=np.uint32)
    np.bitwise_or.at(len_masks, (depth[at], ids >> 5), np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)))
    len_masks = np.bitwise_or.accumulate(len_masks, axis=0)  # (row 0: no token is empty)
    len_masks.flags.writeable = False
    return TokenTrie(byte, depth, skip, off, ids, max_depth, width, node_sub, maxd, tok_buckets, tok_len, by_len, len_off, parent,
                     tuple(levels), at, by_depth_byte, depth_byte_off, len_masks)  # fmt: skip


_TRIES: dict[int, tuple[TokenVocab, TokenTrie]] = {}
_TRIES_LOCK = threading.Lock()


def token_trie(vocab: TokenVocab) -> TokenTrie:
    """The vocabulary's trie, built once per vocabulary (a few kept, keyed by identity)."""
    with _TRIES_LOCK:
        hit = _TRIES.get(id(vocab))
        if hit is None or hit[0] is not vocab:
            while len(_TRIES) >= 4:
                del _TRIES[next(iter(_TRIES))]
            hit = _TRIES[id(vocab)] = (vocab, _build_trie(vocab))
        return hit[1]


@functools.cache
def _library(hold_gil: bool = False) -> ctypes.CDLL | None:
    """The compiled walk, or None where no C compiler is at hand (or LOOM_NO_C_WALK is set).
    hold_gil: loaded so that calls keep the GIL (a walk that builds a lazy DFA's rows, which
    Python threads may read, as the step's own calls do)."""
    if os.environ.get("LOOM_NO_C_WALK"):
        return None
    lib = compile_c(_C_SOURCE, "loom_trie_mask", "the grammar-mask walk", hold_gil=hold_gil)
    if lib is None:
        return None
    ptr = ctypes.c_void_p
    lib.loom_trie_mask.argtypes = [ptr, ptr, ptr, ptr, ptr, ctypes.c_int64, ptr, ctypes.c_int64, ptr, ctypes.c_int32,
                                   ptr, ptr, ptr, ptr, ptr, ctypes.c_uint64, ctypes.c_int32, ptr, ptr,
                                   ptr, ptr, ptr, ptr, ptr, ctypes.c_int64]  # fmt: skip
    lib.loom_trie_mask.restype = ctypes.c_int32
    lib.loom_safe_run.argtypes = [ptr, ctypes.c_int64, ptr, ctypes.c_int32, ctypes.c_int32, ptr, ctypes.c_uint64, ctypes.c_int32,
                                  ctypes.c_int32, ctypes.c_int32, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ptr, ptr,
                                  ptr, ptr, ptr, ptr, ptr, ctypes.c_int64]  # fmt: skip
    lib.loom_safe_run.restype = ctypes.c_int64
    return lib


def available() -> bool:
    return _library() is not None


def trie_mask(
    trie: TokenTrie,
    table: np.ndarray,
    byte_class: np.ndarray,
    dead: int,
    state: int,
    lazy: SubsetDFA | None = None,
) -> np.ndarray | None:
    """Packed words [ceil(V / 32)] uint32 of the tokens whose bytes keep `state` alive in the DFA
    `table` [S, C] int32 (byte_class [256] int64 -> column); None where the walk is not compiled.
    A table built on demand (`lazy`, its SubsetDFA: lazy_dfa.py) holds UNKNOWN (-1) rows: where
    the DFA builds rows in C the walk builds them itself; else it stops at one, `lazy` builds
    it in Python (the table may be reallocated), and the walk resumes."""
    lib = _library()
    if lib is None:
        return None
    assert byte_class.dtype == np.int64, "the walk reads raw arrays"
    unsafe, run, ends_dead, table = _safe_run(table, byte_class, dead, state, trie.max_depth, lazy)
    safe_byte = ((BUCKET_BIT & np.uint64(unsafe)) == 0).view(np.uint8)
    out = safe_mask(trie, unsafe, run).copy() if run else np.zeros(trie.width, dtype=np.uint32)
    stack = np.zeros(trie.max_depth + 1, dtype=np.int32)
    stack[0] = state
    safe = np.zeros(trie.max_depth + 1, dtype=np.uint8)
    safe[0] = 1
    pos = np.zeros(1, dtype=np.int64)
    nodes, walk, n_cls = len(trie.node_byte), lib.loom_trie_mask, table.shape[1]
    fixed = (byte_class.ctypes.data, dead, stack.ctypes.data, out.ctypes.data, pos.ctypes.data, *trie.sub_pointers, unsafe,
             trie.max_depth if ends_dead else run, safe_byte.ctypes.data, safe.ctypes.data)  # fmt: skip
    if lazy is not None and lazy.builds_in_c():
        building = _library(hold_gil=True).loom_trie_mask
        lazy.build_in_place(lambda at, step: building(*trie.pointers, nodes, at, n_cls, *fixed, *step))
        return out
    while True:
        assert table.dtype == np.int32 and table.flags.c_contiguous, "the walk reads raw arrays"
        unknown = walk(*trie.pointers, nodes, table.ctypes.data, n_cls, *fixed, None, None, None, None, None, 0)
        if unknown < 0:
            return out
        assert lazy is not None, f"state {unknown} has no row in a table that is not built on demand"
        lazy.expand(unknown)
        table = lazy.table


_PENDING = 64  # rows loom_safe_run asks for at once (its PENDING)
# Steps a safe set is followed where it does not loop (a counted string), each a state the walk
# builds ahead: tokens are rarely longer (at 128k: 109 tokens; 3.7k nodes above them, where a run
# of 32 left 30k), and the first mask in a long string builds half the states a run of 136 did.
_RUN_CAP = 64
_RUN_ENDS_DEAD = 1 << 30  # (its RUN_ENDS_DEAD)
# Fewer live bytes than this: no safe set is looked for (its ~40 us cost more than the walk it saves).
_MIN_SAFE_BYTES = 32


def _safe_run(
    table: np.ndarray,
    byte_class: np.ndarray,
    dead: int,
    state: int,
    max_depth: int,
    lazy: SubsetDFA | None = None,
) -> tuple[int, int, bool, np.ndarray]:
    """(unsafe buckets, run, ends dead, table): the byte groups that all lead `state` to one live
    successor, and how many bytes of them in a row stay live (each successor leading them all to one
    live state; max_depth once one loops: a string's contents), and whether a further safe byte
    kills (a count's end: a subtree of safe bytes, however deep, holds no other live token). A
    token of at most `run` safe bytes is allowed, so the walk takes the tokens of whole subtrees of
    them from one cached mask (a string's contents, `[a-f0-9]{40}`: most of the vocabulary) instead
    of visiting them.
    A state that loops and that every well-formed UTF-8 character loops too counts ILL_FORMED
    (and C1_CONTROL where those characters kill it) unsafe instead of the multi-byte bytes' groups:
    its walk skips the tokens of such characters as well (half the nodes a JSON string's state
    visited at 128k).
    `table` is returned as it may be, grown by `lazy` (the table's SubsetDFA, building the rows it reads).
    The search runs in C (loom_safe_run; in numpy it cost ~150 us a string state, in a decode's
    cold caches). Where `lazy` builds rows in C the search builds those it reads itself (a counted
    string's run is followed to max_depth: a run of 32 left ~28k nodes above longer tokens to
    walk at 128k); else it returns the rows it needs, a level of UTF-8 states at a time."""
    lib, unsafe, pending = _library(), ctypes.c_uint64(), np.zeros(_PENDING + 1, dtype=np.int32)
    assert lib is not None, "only the C walk asks"
    fixed = (byte_class.ctypes.data, dead, state, _BUCKET_BIT_ADDRESS, ALL_BUCKETS, _MIN_SAFE_BYTES, min(_RUN_CAP, max_depth), max_depth,
             HI_BUCKETS, ILL_FORMED, C1_CONTROL, ctypes.byref(unsafe), pending.ctypes.data)  # fmt: skip
    n_cls = table.shape[1]
    if lazy is not None and lazy.builds_in_c():
        found: list[int] = []
        search = _library(hold_gil=True).loom_safe_run

        def step(at: int, builder: tuple[int, ...]) -> int:
            run = search(at, n_cls, *fixed, *builder)
            if run >= 0:
                found.append(run)
                return -1
            return -2 if run == -2 else int(pending[1])  # (a row it lacked room for: grown, called again)

        lazy.build_in_place(step)
        return unsafe.value, found[0] & ~_RUN_ENDS_DEAD, bool(found[0] & _RUN_ENDS_DEAD), lazy.table
    while True:
        assert table.dtype == np.int32 and table.flags.c_contiguous, "the search reads raw arrays"
        run = lib.loom_safe_run(table.ctypes.data, n_cls, *fixed, None, None, None, None, None, 0)
        if run >= 0:
            return unsafe.value, run & ~_RUN_ENDS_DEAD, bool(run & _RUN_ENDS_DEAD), table
        if lazy is None or run == -2:  # (a row not built in a table that is not built on demand: nothing is safe)
            return ALL_BUCKETS, 0, False, table
        for q in pending[1 : 1 + pending[0]].tolist():
            lazy.expand(q)
        table = lazy.table


def safe_mask(trie: TokenTrie, unsafe: int, run: int) -> np.ndarray:
    """Packed words of the tokens of at most `run` bytes, none in the `unsafe` buckets (cached per
    trie: a few sets recur, a JSON string's contents in every schema). A new run of a cached set
    is the nearest cached run's mask with the tokens of the lengths between set or cleared: a
    counted run (a `maxLength` chunk) asks for a new run at nearly every step. With no bucket
    unsafe it is the trie's kept mask of the tokens of at most `run` bytes."""
    run = min(run, trie.max_depth)  # (every longer run is the same mask)
    if not unsafe:
        return trie.len_masks[run]
    words = trie.safe_masks.get((unsafe, run))
    if words is not None:
        return words
    listed = trie.safe_listed.get(unsafe)
    if listed is None:  # the set's tokens by length, and the runs cached
        if len(trie.safe_listed) >= _LAST_UNSAFE_KEPT:
            trie.safe_listed.clear()  # (their masks stay; only deriving new runs from them starts afresh)
        ids = trie.by_len[(trie.tok_buckets[trie.by_len] & np.uint64(unsafe)) == 0]
        listed = trie.safe_listed[unsafe] = (ids, np.searchsorted(trie.tok_len[ids], np.arange(trie.max_depth + 2)), [])
    ids, off, runs = listed
    i = bisect.bisect_left(runs, run)
    near = min(runs[max(i - 1, 0) : i + 1], key=lambda r: abs(r - run), default=None)
    base = trie.safe_masks.get((unsafe, near)) if near is not None else None  # (another thread may have cleared it)
    bits = np.zeros(trie.width * 32, dtype=bool)
    if base is not None and abs(off[near + 1] - off[run + 1]) <= len(ids) // 4:  # the tokens of lengths in between
        lo, hi = sorted((off[near + 1], off[run + 1]))
        bits[ids[lo:hi]] = True
        delta = np.packbits(bits, bitorder="little").view(np.uint32)
        words = base | delta if near < run else base & ~delta
    else:
        bits[ids[: off[run + 1]]] = True
        words = np.packbits(bits, bitorder="little").view(np.uint32)
    if len(trie.safe_masks) >= _SAFE_MASKS_KEPT:
        trie.safe_masks.clear()
        for _, _, held in list(trie.safe_listed.values()):  # (a snapshot: another thread may add a set)
            held.clear()
    trie.safe_masks[(unsafe, run)] = words
    bisect.insort(runs, run)
    return words


def last_unsafe_byte(trie: TokenTrie, unsafe: int) -> np.ndarray:
    """[width * 32] int32: per token, the position (1-based) of its last byte in the `unsafe`
    buckets, 0 where it has none (past max_depth: not in the trie). A token's bytes after position
    p are all safe iff this is <= p (cached per trie and bucket set)."""
    out = trie.last_unsafe.get(unsafe)
    if out is None:
        bad = (BUCKET_BIT[trie.node_byte] & np.uint64(unsafe)) != 0
        last = np.where(bad, trie.node_depth, 0).astype(np.int32)  # [N] along each node's path
        for idx in trie.levels:  # parents before children
            last[idx] = np.maximum(last[idx], last[trie.node_parent[idx]])
        out = np.full(trie.width * 32, trie.max_depth + 1, dtype=np.int32)
        out[trie.tok_ids] = last[trie.tok_node]
        if len(trie.last_unsafe) >= _LAST_UNSAFE_KEPT:
            trie.last_unsafe.clear()
        trie.last_unsafe[unsafe] = out
    return out
