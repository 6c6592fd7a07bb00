"""The subset step of lazy_dfa.SubsetDFA in C: a lazy DFA state's row for a tenth of the Python step's time.

    available() -> bool                                    whether the step is compiled (else SubsetDFA's Python step)
    subsets = NativeSubsets(nfa, start, final, live, max_states)   the NFA copied into C; .byte_class, .n_cls
    n = subsets.expand(q, table, accepting, expanded)     state q's row into table[q]; -> the number of states
    moore(table, classes) -> classes                       dfa.minimal_dfa's refinement (None: not compiled)

Why: a 16-request batch with a new schema per request builds each schema's DFA states as masks
reach them, and a `maxLength: 80` string alone reaches ~1,000; at 20-50 us a state in Python
(epsilon closures over lists of tuples, frozensets, dict look-ups) that was most of the per-token
grammar time. Here the NFA sits in flat int32 arrays and the whole step (targets by byte class,
epsilon closure, the subset's sorted members hashed into a table of known subsets) runs in C. The
numbering is the Python step's (classes in order, new subsets numbered as met), so both build the
same table. Measured over 18.6k states of the 8 bench_grammar_first_token schemas and a
`maxLength: 80` string, built breadth first: 4.2 us a state (ctypes call included), 49 us in Python.

The NFA is not filled in first (nfa.py's spliced fragments stay unread in Python): the builder
gets the NFA's own states (absolute targets) and each spliced fragment once (relative targets,
flattened once per fragment and kept on it, so a cached piece such as a `date-time` is flattened
once per process), plus segments saying which states read which fragment at which offset; C
copies them into one template, each NFA state s reading entry where[s], targets + shift[s]. A
schema with 80 copies of a string's character costs 80 segments in Python, the rest is C's.

Compiled once per machine by native_c.compile_c and loaded with ctypes.PyDLL: the GIL stays held during a step, so two
threads never run one builder at once. LOOM_NO_C_SUBSET=1, or no compiler, leaves the Python step.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import os
import weakref

import numpy as np

from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.nfa import NFA, Fragment

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* NFA state s reads template entry w = where[s]: byte edges edges[3 * (eoff[w] .. eoff[w + 1])] as
   (lo, hi, target) triples and epsilon moves eps[poff[w] .. poff[w + 1]], targets + shift[s].
   live == NULL: every state can reach the final one. DFA state 0 is the start, 1 the empty subset. */
typedef struct {
    int64_t n;
    int32_t *where, *shift, *eoff, *edges, *poff, *eps;  /* owned copies */
    uint8_t *live;                /* NULL: all live */
    int64_t byte_class[256];
    int32_t final, n_cls, max_states;
    uint32_t gen, *mark;          /* [n] closure visits, by generation */
    int32_t *stack, *out;         /* [n] each */
    int32_t *count, *boff;        /* [n_cls + 1] each: per class, its targets bucket[boff[c] .. boff[c + 1]) */
    int32_t *bucket; int64_t bucket_cap;
    int32_t *arena; int64_t arena_len, arena_cap;   /* the subsets' sorted members */
    int64_t *sub_off; uint64_t *sub_hash; uint8_t *sub_acc;
    int32_t n_states, cap_states;
    int32_t *slots; int64_t n_slots;                /* open addressing: state id, or -1 */
} builder;

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

static uint64_t hash_ids(const int32_t *v, int64_t k) {
    uint64_t h = 0x9E3779B97F4A7C15ull ^ (uint64_t)k;
    for (int64_t i = 0; i < k; i++) {
        h ^= (uint32_t)v[i];
        h *= 0xff51afd7ed558ccdull;
        h ^= h >> 32;
    }
    return h;
}

static int grow(void **p, int64_t *cap, int64_t need, size_t size) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * size);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

/* Epsilon closure of the k seeds in seeds[], keeping the states that read a byte (or the final
   one) and are live, sorted, into b->out. Returns how many. */
static int64_t closure(builder *b, const int32_t *seeds, int64_t k, int *accepts) {
    uint32_t g = ++b->gen;
    if (g == 0) { memset(b->mark, 0, (size_t)b->n * 4); g = b->gen = 1; }
    int64_t top = 0, m = 0;
    *accepts = 0;
    for (int64_t i = 0; i < k; i++) {
        int32_t s = seeds[i];
        if (b->mark[s] != g) { b->mark[s] = g; b->stack[top++] = s; }
    }
    while (top) {
        int32_t u = b->stack[--top], w = b->where[u], sh = b->shift[u];
        if ((b->eoff[w + 1] > b->eoff[w] || u == b->final) && (!b->live || b->live[u])) {
            b->out[m++] = u;
            if (u == b->final) *accepts = 1;
        }
        for (int32_t j = b->poff[w]; j < b->poff[w + 1]; j++) {
            int32_t t = b->eps[j] + sh;
            if (b->mark[t] != g) { b->mark[t] = g; b->stack[top++] = t; }
        }
    }
    qsort(b->out, (size_t)m, 4, cmp_i32);
    return m;
}

/* The id of the subset in b->out[0 .. m) (new ones appended; 1, the dead state, past max_states),
   or -1 when memory runs out. */
static int32_t state_of(builder *b, int64_t m, int accepts, uint8_t *accepting) {
    if (m == 0) return 1;
    uint64_t h = hash_ids(b->out, m);
    int64_t mask = b->n_slots - 1, i = (int64_t)(h & (uint64_t)mask);
    for (;; i = (i + 1) & mask) {
        int32_t q = b->slots[i];
        if (q < 0) break;
        if (b->sub_hash[q] == h && b->sub_off[q + 1] - b->sub_off[q] == m
            && memcmp(b->arena + b->sub_off[q], b->out, (size_t)m * 4) == 0) return q;
    }
    if (b->n_states >= b->max_states) return 1;  /* past the bound: narrower, never wrong */
    int32_t q = b->n_states;
    if (q + 1 >= b->cap_states) {
        int32_t c = b->cap_states * 2;
        int64_t *o = realloc(b->sub_off, (size_t)(c + 1) * 8);
        if (!o) return -1;
        b->sub_off = o;
        uint64_t *hh = realloc(b->sub_hash, (size_t)c * 8);
        if (!hh) return -1;
        b->sub_hash = hh;
        uint8_t *a = realloc(b->sub_acc, (size_t)c);
        if (!a) return -1;
        b->sub_acc = a;
        b->cap_states = c;
    }
    if (grow((void **)&b->arena, &b->arena_cap, b->arena_len + m, 4)) return -1;
    memcpy(b->arena + b->arena_len, b->out, (size_t)m * 4);
    b->arena_len += m;
    b->sub_off[q + 1] = b->arena_len;
    b->sub_hash[q] = h;
    b->sub_acc[q] = (uint8_t)accepts;
    if (accepting) accepting[q] = (uint8_t)accepts;
    b->slots[i] = q;
    b->n_states = q + 1;
    if (2 * (int64_t)b->n_states > b->n_slots) {  /* rehash at half full */
        int64_t n2 = b->n_slots * 2;
        int32_t *s2 = malloc((size_t)n2 * 4);
        if (!s2) return -1;
        memset(s2, 0xff, (size_t)n2 * 4);
        for (int32_t p = 0; p < b->n_states; p++) {
            int64_t j = (int64_t)(b->sub_hash[p] & (uint64_t)(n2 - 1));
            while (s2[j] >= 0) j = (j + 1) & (n2 - 1);
            s2[j] = p;
        }
        free(b->slots);
        b->slots = s2;
        b->n_slots = n2;
    }
    return q;
}

void loom_subset_free(builder *b) {
    if (!b) return;
    free(b->where); free(b->shift); free(b->eoff); free(b->edges); free(b->poff); free(b->eps); free(b->live);
    free(b->mark); free(b->stack); free(b->out); free(b->count); free(b->boff); free(b->bucket);
    free(b->arena); free(b->sub_off); free(b->sub_hash); free(b->sub_acc); free(b->slots);
    free(b);
}

/* The NFA of n states from parts (each: entry offsets eoff [k + 1], edges [3 * E] as (lo, hi, target),
   epsilon offsets poff [k + 1], epsilon targets), addresses in part_ptrs (4 per part), part_size[p]
   entries each, copied; and segments (first state, part, first entry, shift), ascending by first
   state: states first .. (the next segment's first - 1) read the part's entries from `first entry`
   on, targets + shift. live: [n] or NULL. Writes the byte classes (every edge bound a cut) into
   byte_class_out [256] and their number into *n_cls_out. */
builder *loom_subset_new(int64_t n, int32_t n_parts, const int64_t *part_ptrs, const int32_t *part_size,
                         int32_t n_segs, const int32_t *segs, const uint8_t *live, int32_t final, int32_t start,
                         int32_t max_states, int64_t *byte_class_out, int32_t *n_cls_out) {
    builder *b = calloc(1, sizeof(builder));
    if (!b) return NULL;
    b->n = n; b->final = final; b->max_states = max_states;
    int64_t entries = 0, n_edges = 0, n_eps = 0;
    for (int32_t p = 0; p < n_parts; p++) {
        const int32_t *eo = (const int32_t *)part_ptrs[4 * p], *po = (const int32_t *)part_ptrs[4 * p + 2];
        entries += part_size[p]; n_edges += eo[part_size[p]]; n_eps += po[part_size[p]];
    }
    int64_t *base = malloc(((size_t)n_parts + 1) * 8);
    b->eoff = malloc(((size_t)entries + 1) * 4); b->poff = malloc(((size_t)entries + 1) * 4);
    b->edges = malloc(((size_t)n_edges * 3 + 1) * 4); b->eps = malloc(((size_t)n_eps + 1) * 4);
    b->where = malloc(((size_t)n + 1) * 4); b->shift = malloc(((size_t)n + 1) * 4);
    if (live) { b->live = malloc((size_t)n + 1); if (b->live) memcpy(b->live, live, (size_t)n); }
    if (!base || !b->eoff || !b->poff || !b->edges || !b->eps || !b->where || !b->shift || (live && !b->live)) {
        free(base); loom_subset_free(b); return NULL;
    }
    uint8_t cut[257] = {0};
    cut[0] = cut[256] = 1;
    int64_t e_at = 0, p_at = 0, w = 0;
    for (int32_t p = 0; p < n_parts; p++) {
        const int32_t *eo = (const int32_t *)part_ptrs[4 * p], *ed = (const int32_t *)part_ptrs[4 * p + 1];
        const int32_t *po = (const int32_t *)part_ptrs[4 * p + 2], *ep = (const int32_t *)part_ptrs[4 * p + 3];
        int32_t k = part_size[p];
        base[p] = w;
        for (int32_t i = 0; i < k; i++) { b->eoff[w + i] = (int32_t)(e_at + eo[i]); b->poff[w + i] = (int32_t)(p_at + po[i]); }
        memcpy(b->edges + 3 * e_at, ed, (size_t)eo[k] * 12);
        memcpy(b->eps + p_at, ep, (size_t)po[k] * 4);
        for (int32_t j = 0; j < eo[k]; j++) { cut[ed[3 * j]] = 1; cut[ed[3 * j + 1] + 1] = 1; }
        e_at += eo[k]; p_at += po[k]; w += k;
    }
    b->eoff[w] = (int32_t)e_at; b->poff[w] = (int32_t)p_at;
    for (int32_t k = 0; k < n_segs; k++) {
        const int32_t *sg = segs + 4 * k;
        int64_t hi = k + 1 < n_segs ? segs[4 * (k + 1)] : n;
        for (int64_t s = sg[0]; s < hi; s++) { b->where[s] = (int32_t)(base[sg[1]] + sg[2] + (s - sg[0])); b->shift[s] = sg[3]; }
    }
    free(base);
    int32_t c = -1;
    for (int32_t x = 0; x < 256; x++) { if (cut[x]) c++; b->byte_class[x] = c; byte_class_out[x] = c; }
    b->n_cls = *n_cls_out = c + 1;
    int32_t C = b->n_cls;
    b->mark = calloc((size_t)n + 1, 4);
    b->stack = malloc(((size_t)n + 1) * 4);
    b->out = malloc(((size_t)n + 1) * 4);
    b->count = malloc(((size_t)C + 1) * 4);
    b->boff = malloc(((size_t)C + 1) * 4);
    b->cap_states = 64;
    b->sub_off = malloc(65 * 8);
    b->sub_hash = malloc(64 * 8);
    b->sub_acc = malloc(64);
    b->n_slots = 256;
    b->slots = malloc(256 * 4);
    if (!b->mark || !b->stack || !b->out || !b->count || !b->boff || !b->sub_off || !b->sub_hash
        || !b->sub_acc || !b->slots) { loom_subset_free(b); return NULL; }
    memset(b->slots, 0xff, 256 * 4);
    b->sub_off[0] = 0;
    int accepts;
    int64_t m = closure(b, &start, 1, &accepts);
    /* state 0: the start's closure (maybe empty: the caller says the regex matches nothing) */
    if (grow((void **)&b->arena, &b->arena_cap, m + 1, 4)) { loom_subset_free(b); return NULL; }
    memcpy(b->arena, b->out, (size_t)m * 4);
    b->arena_len = m;
    b->sub_off[1] = m;
    b->sub_hash[0] = hash_ids(b->out, m);
    b->sub_acc[0] = (uint8_t)accepts;
    b->sub_off[2] = m;  /* state 1: the empty subset, never looked up (state_of answers 1 for it) */
    b->sub_hash[1] = 0;
    b->sub_acc[1] = 0;
    b->n_states = 2;
    if (m) b->slots[(int64_t)(b->sub_hash[0] & 255)] = 0;
    return b;
}

int64_t loom_subset_members(const builder *b, int32_t q, int32_t *out) {
    int64_t k = b->sub_off[q + 1] - b->sub_off[q];
    if (out) memcpy(out, b->arena + b->sub_off[q], (size_t)k * 4);
    return k;
}

int32_t loom_subset_accepts(const builder *b, int32_t q) { return b->sub_acc[q]; }

/* Build state q's row into table[q * n_cls ..] (rows up to capacity exist; the caller keeps room
   for n_cls new states), new states' accepting flags, expanded[q] = 1. Returns the number of
   states, or -1 when memory runs out. */
int32_t loom_subset_expand(builder *b, int32_t q, int32_t *table, uint8_t *accepting, uint8_t *expanded) {
    int32_t C = b->n_cls;
    const int64_t *cls = b->byte_class;
    memset(b->count, 0, (size_t)(C + 1) * 4);
    int64_t lo_m = b->sub_off[q], hi_m = b->sub_off[q + 1], total = 0;
    for (int64_t i = lo_m; i < hi_m; i++) {
        int32_t s = b->arena[i], w = b->where[s], sh = b->shift[s];
        for (int32_t j = b->eoff[w]; j < b->eoff[w + 1]; j++) {
            const int32_t *e = b->edges + 3 * (int64_t)j;
            if (b->live && !b->live[e[2] + sh]) continue;
            int32_t c0 = (int32_t)cls[e[0]], c1 = (int32_t)cls[e[1]];
            for (int32_t c = c0; c <= c1; c++) b->count[c]++;
            total += c1 - c0 + 1;
        }
    }
    if (grow((void **)&b->bucket, &b->bucket_cap, total + 1, 4)) return -1;
    b->boff[0] = 0;
    for (int32_t c = 0; c < C; c++) { b->boff[c + 1] = b->boff[c] + b->count[c]; b->count[c] = b->boff[c]; }
    for (int64_t i = lo_m; i < hi_m; i++) {  /* in member order, as the Python step appends them */
        int32_t s = b->arena[i], w = b->where[s], sh = b->shift[s];
        for (int32_t j = b->eoff[w]; j < b->eoff[w + 1]; j++) {
            const int32_t *e = b->edges + 3 * (int64_t)j;
            int32_t t = e[2] + sh;
            if (b->live && !b->live[t]) continue;
            int32_t c0 = (int32_t)cls[e[0]], c1 = (int32_t)cls[e[1]];
            for (int32_t c = c0; c <= c1; c++) b->bucket[b->count[c]++] = t;
        }
    }
    int32_t *row = table + (int64_t)q * C;
    for (int32_t c = 0; c < C; c++) {
        int32_t k = b->boff[c + 1] - b->boff[c];
        if (k == 0) { row[c] = 1; continue; }
        if (c > 0 && k == b->boff[c] - b->boff[c - 1]
            && memcmp(b->bucket + b->boff[c], b->bucket + b->boff[c - 1], (size_t)k * 4) == 0) {
            row[c] = row[c - 1];  /* the same targets as the class before: the same state */
            continue;
        }
        int accepts;
        int64_t m = closure(b, b->bucket + b->boff[c], k, &accepts);
        int32_t t = state_of(b, m, accepts, accepting);
        if (t < 0) return -1;
        row[c] = t;
    }
    expanded[q] = 1;
    return b->n_states;
}

/* Moore refinement of a DFA's partition: table [n, c] int32 (successor ids), cls [n] the class of
   each state (any ids), refined in place to the coarsest partition that the table keeps (two
   states apart iff some string tells them apart), ids numbered by first appearance. -> the number
   of classes. next [n] and rep [hcap] (hcap a power of two >= 2n) are scratch. A round hashes each
   state's (class, successors' classes) into the table of the round's representatives. */
int64_t loom_moore(const int32_t *table, int64_t n, int64_t c, int64_t *cls, int64_t *next, int64_t *rep, int64_t hcap) {
    int64_t count = -1;
    for (;;) {
        for (int64_t i = 0; i < hcap; i++) rep[i] = -1;
        int64_t k = 0;
        for (int64_t q = 0; q < n; q++) {
            const int32_t *row = table + q * c;
            uint64_t h = (uint64_t)cls[q] * 0x9E3779B97F4A7C15ULL;
            for (int64_t j = 0; j < c; j++) h = (h ^ (uint64_t)cls[row[j]]) * 0x100000001B3ULL;
            uint64_t i = (h ^ (h >> 31)) & (uint64_t)(hcap - 1);
            for (;;) {
                int64_t r = rep[i];
                if (r < 0) {
                    rep[i] = q;
                    next[q] = k++;
                    break;
                }
                if (cls[r] == cls[q]) {
                    const int32_t *other = table + r * c;
                    int64_t j = 0;
                    while (j < c && cls[other[j]] == cls[row[j]]) j++;
                    if (j == c) {
                        next[q] = next[r];
                        break;
                    }
                }
                i = (i + 1) & (uint64_t)(hcap - 1);
            }
        }
        memcpy(cls, next, n * sizeof(int64_t));
        if (k == count) return k;
        count = k;
    }
}
"""


@functools.cache
def _library() -> ctypes.PyDLL | None:
    """The compiled subset step, or None (no compiler, or LOOM_NO_C_SUBSET set)."""
    if os.environ.get("LOOM_NO_C_SUBSET"):
        return None
    lib = compile_c(_C_SOURCE, "loom_subset", "the lazy DFA's subset step", hold_gil=True)
    if lib is None:
        return None
    ptr, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.loom_subset_new.argtypes = [i64, i32, ptr, ptr, i32, ptr, ptr, i32, i32, i32, ptr, ptr]
    lib.loom_subset_new.restype = ptr
    lib.loom_subset_free.argtypes = [ptr]
    lib.loom_subset_free.restype = None
    lib.loom_subset_expand.argtypes = [ptr, i32, ptr, ptr, ptr]
    lib.loom_subset_expand.restype = i32
    lib.loom_subset_members.argtypes = [ptr, i32, ptr]
    lib.loom_subset_members.restype = i64
    lib.loom_subset_accepts.argtypes = [ptr, i32]
    lib.loom_subset_accepts.restype = i32
    lib.loom_moore.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64]
    lib.loom_moore.restype = i64
    return lib


def available() -> bool:
    return _library() is not None


def moore(table: np.ndarray, classes: np.ndarray) -> np.ndarray | None:
    """dfa.minimal_dfa's refinement in C: the coarsest partition refining `classes` [n] that the
    DFA `table` [n, C] keeps, as class ids [n] int64 (~100x the numpy rounds' speed on a terminal
    of tens of states: 0.5 ms of a grammar's compile per terminal); None without the library."""
    lib = _library()
    if lib is None:
        return None
    table = np.ascontiguousarray(table, dtype=np.int32)
    n = table.shape[0]
    out = np.ascontiguousarray(classes, dtype=np.int64).copy()
    hcap = 1 << max(2 * n - 1, 1).bit_length()
    scratch, rep = np.empty(n, dtype=np.int64), np.empty(hcap, dtype=np.int64)
    lib.loom_moore(table.ctypes.data, n, table.shape[1], out.ctypes.data, scratch.ctypes.data, rep.ctypes.data, hcap)
    return out


def _flat(lists: list, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-state lists of tuples (width > 1) or ints -> (offsets [n + 1] int32, values [total * width] int32)."""
    off = np.fromiter(itertools.accumulate(map(len, lists), initial=0), dtype=np.int32, count=len(lists) + 1)
    items = itertools.chain.from_iterable(lists)
    if width > 1:
        items = itertools.chain.from_iterable(items)
    values = np.fromiter(items, dtype=np.int32, count=int(off[-1]) * width)
    return off, values


def _part(edges: list | tuple, eps: list | tuple) -> tuple[tuple[np.ndarray, ...], list[int]]:
    """States' edge and epsilon lists as the C builder's part: (the 4 arrays, their addresses)."""
    arrays = (*_flat(edges, 3), *_flat(eps, 1))
    return arrays, [a.ctypes.data for a in arrays]


def fragment_part(frag: Fragment) -> tuple[tuple[np.ndarray, ...], list[int]]:
    """A fragment as a part (targets relative to it), flattened once and kept on the fragment: a
    cached piece is flattened once per process."""
    if not frag.flat:
        frag.flat.append(_part(frag.edges, frag.eps))
    return frag.flat[0]


class NativeSubsets:
    """One SubsetDFA's subsets, built by the C step (states numbered as the Python step numbers
    them), and the NFA's byte classes. The C builder copies the NFA; it is freed with this object."""

    def __init__(self, nfa: NFA, start: int, final: int, live: list[bool] | None, max_states: int) -> None:
        """live: per NFA state, whether it reaches the final one (None: all do)."""
        lib = _library()
        assert lib is not None, "NativeSubsets needs the compiled step (subset_native.available())"
        n = len(nfa.edges)
        # Segments (first state, part, first entry, shift): the NFA's own states (filled: outside
        # every splice, or a splice's end, which is filled when spliced and linked onwards) are part
        # 0, in state order; a splice's other states read its fragment's part.
        own: list[int] = []
        segs: list[int] = []
        parts: list[list[int]] = []
        part_size: list[int] = []
        keep: list[tuple[np.ndarray, ...]] = []  # the parts' arrays, alive until the builder has copied them
        at: dict[int, int] = {}  # id(fragment) -> its part
        prev = 0
        for b, frag in nfa.spliced:
            if b > prev:
                segs += (prev, 0, len(own), 0)
                own += range(prev, b)
            p = at.get(id(frag))
            if p is None:
                arrays, pointers = fragment_part(frag)
                p = at[id(frag)] = len(parts) + 1
                parts.append(pointers)
                part_size.append(len(frag.edges))
                keep.append(arrays)
            end = frag.end
            if end > 0:
                segs += (b, p, 0, b)
            segs += (b + end, 0, len(own), 0)
            own.append(b + end)
            if end + 1 < len(frag.edges):
                segs += (b + end + 1, p, end + 1, b)
            prev = b + len(frag.edges)
        if n > prev:
            segs += (prev, 0, len(own), 0)
            own += range(prev, n)
        own_eps = [nfa.eps[s] for s in own]
        assert None not in own_eps, "an NFA state outside every splice is always filled"
        arrays, pointers = _part([nfa.edges[s] for s in own], own_eps)
        keep.append(arrays)
        ptrs = np.array(pointers + [x for p in parts for x in p], dtype=np.int64)
        sizes = np.array([len(own), *part_size], dtype=np.int32)
        seg = np.array(segs, dtype=np.int32)
        live_arr = None if live is None else np.array(live, dtype=np.uint8)
        self.byte_class = np.zeros(256, dtype=np.int64)  # [256] byte -> class (every edge bound a cut)
        n_cls = ctypes.c_int32(0)
        handle = lib.loom_subset_new(n, len(sizes), ptrs.ctypes.data, sizes.ctypes.data, len(seg) // 4, seg.ctypes.data,
                                     None if live_arr is None else live_arr.ctypes.data, final, start, max_states,
                                     self.byte_class.ctypes.data, ctypes.byref(n_cls))  # fmt: skip
        if not handle:
            raise MemoryError("the lazy DFA's subset builder could not be allocated")
        self.n_cls = n_cls.value
        self._handle = handle
        self._expand = lib.loom_subset_expand
        self._lib = lib
        # (the step's C address and its builder: a walk of the token trie calls it for the rows it lacks)
        self.step_in_c = (ctypes.cast(lib.loom_subset_expand, ctypes.c_void_p).value, handle)
        weakref.finalize(self, lib.loom_subset_free, handle)

    def start_size(self) -> int:
        """How many NFA states the start subset holds (0: the regex matches nothing)."""
        return int(self._lib.loom_subset_members(self._handle, 0, None))

    def accepts(self, q: int) -> bool:
        return bool(self._lib.loom_subset_accepts(self._handle, q))

    def members(self, q: int) -> frozenset[int]:
        """State q's NFA states (for tests: the Python step's frozenset)."""
        k = int(self._lib.loom_subset_members(self._handle, q, None))
        out = np.zeros(max(k, 1), dtype=np.int32)
        self._lib.loom_subset_members(self._handle, q, out.ctypes.data)
        return frozenset(out[:k].tolist())

    def expand(self, q: int, table: int, accepting: int, expanded: int) -> int:
        """Build state q's row: table, accepting, expanded are the addresses of the SubsetDFA's
        arrays ([capacity, C] int32, [capacity] bool, [capacity] bool), with room for n_cls new
        states. -> the number of states."""
        n = self._expand(self._handle, q, table, accepting, expanded)
        if n < 0:
            raise MemoryError("the lazy DFA's subset builder ran out of memory")
        return n
