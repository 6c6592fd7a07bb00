"""The EBNF engine's walk of tokens that cross a lexeme end, in C when a compiler is at hand.

    walker = CrossingWalker(compiled)       once per compiled grammar (None-returning without C)
    ids = walker.accepted(offset, sid, ids) the token ids whose bytes from `offset` on are accepted
                                            from a lexeme boundary at stack `sid`

This is ebnf_masks' `_accepted_from` (a Python walk of each token's remainder, one memoised parser
step per byte) done in C, where a new position costs ~10 µs per byte in Python: a remainder is
stepped as a set of configurations (stack * n_lex + lexer state) through the lexer's table, and a
lexeme end looks up the stack after it in the stack's row. A row lists, per interned stack, the
terminals a lexeme may be of there and the stack once one is complete (CompiledEbnf.startable /
after). The walk fills a row it lacks itself, from the grammar's LALR table and stacks in C
(lalr_native.py, compiled into this library); where the row arrays lack room it returns the
stack's id, Python grows them and fills the row, and C resumes at the token it stopped on, so the
C walk is the Python one, set by set, MAX_CONFIGS truncation included. A walk that completes no
lexeme but to stay at its stack (shallow) read only the stack's signature (its startable
terminals): its verdict is kept for every stack of that signature.

LOOM_NO_C_EBNF=1 turns the C walk off (the Python walk stays).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.runtime.constrained.bitmask import bitmask_width, unpack_ids
from loom.runtime.constrained.lalr_native import C_SOURCE as LALR_C_SOURCE
from loom.runtime.constrained.lalr_native import NativeStacks
from loom.runtime.constrained.lalr_native import bind as bind_lalr
from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.vocabulary import token_rows

if TYPE_CHECKING:
    from loom.runtime.constrained.ebnf import CompiledEbnf

_C_SOURCE = LALR_C_SOURCE + r"""
typedef struct ctx ctx_t;
static int fill_row(ctx_t *x, int64_t s);

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Rows: stack sid's row is row_pairs[2 * row_off[sid] ..) of row_len[sid] (terminal, stack after)
   pairs sorted by terminal; row_off[sid] < 0 (or sid >= n_rows) means not filled yet. */
#define NEED(s) do { if (((s) >= n_rows || row_off[s] < 0) && fill_row(x, (s))) { *need = (s); return -2; } } while (0)

/* One step of the sorted set cur[0..n) by byte b into out (sorted, unique, at most max_configs
   smallest kept); returns its size, or -2 with *need set when a row is missing. *deep is set when
   a lexeme completes at a stack other than start_sid, or goes on at one (the step then depends on
   more of the stack than start_sid's startable terminals: see loom_ebnf_cross). */
static int64_t step_set(const int64_t *cur, int64_t n, int b, int64_t *out, int64_t *scratch, int64_t scratch_cap,
                        const int32_t *trans, const uint8_t *accepting, const int32_t *lex_terminal,
                        const int32_t *offsets, int64_t n_lex, int64_t boundary, const int64_t *row_off,
                        const int32_t *row_len, const int32_t *row_pairs, int64_t n_rows, int64_t max_configs,
                        int64_t *need, int64_t start_sid, int *deep, ctx_t *x) {
    int64_t m = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t c = cur[i], sid = c / n_lex, lex = c % n_lex, starts = -1;
        if (lex == boundary) {
            starts = sid;
        } else {
            int32_t nxt = trans[lex * 256 + b];
            if (nxt >= 0) {
                if (m >= scratch_cap) return -3;
                scratch[m++] = sid * n_lex + nxt;
            }
            if (accepting[lex]) {
                NEED(sid);
                int32_t t = lex_terminal[lex];
                const int32_t *p = row_pairs + 2 * row_off[sid];
                for (int32_t k = 0; k < row_len[sid]; k++)
                    if (p[2 * k] == t) { starts = p[2 * k + 1]; break; }
                if (sid != start_sid || starts != start_sid) *deep = 1;
            }
        }
        if (starts >= 0) {
            NEED(starts);
            const int32_t *p = row_pairs + 2 * row_off[starts];
            for (int32_t k = 0; k < row_len[starts]; k++) {
                int32_t nxt = trans[(int64_t)offsets[p[2 * k]] * 256 + b];
                if (nxt >= 0) {
                    if (m >= scratch_cap) return -3;
                    scratch[m++] = starts * n_lex + nxt;
                }
            }
        }
    }
    if (m > 32) {
        qsort(scratch, m, sizeof(int64_t), cmp_i64);
    } else {  /* the usual: a configuration or two */
        for (int64_t i = 1; i < m; i++) {
            int64_t v = scratch[i], j = i - 1;
            while (j >= 0 && scratch[j] > v) { scratch[j + 1] = scratch[j]; j--; }
            scratch[j + 1] = v;
        }
    }
    int64_t u = 0;
    for (int64_t i = 0; i < m && u < max_configs; i++)
        if (u == 0 || scratch[i] != out[u - 1]) out[u++] = scratch[i];
    return u;
}

struct ctx {
    const int32_t *trans; const uint8_t *accepting; const int32_t *lex_terminal; const int32_t *offsets;
    int64_t n_lex, boundary;
    int64_t *row_off; int32_t *row_len; int32_t *row_pairs; int64_t n_rows;
    const uint8_t *data; int64_t stride; const int64_t *lens; const int64_t *row_of;
    int64_t width, max_configs;
    int64_t *sets, *sizes, *scratch; int64_t scratch_cap;
    int64_t *order;   /* [vocab_size]: the tokens to walk */
    int64_t *first;   /* [256 * max_configs]: the start set stepped by each byte (first_len: -1 not yet) */
    int64_t need;     /* the stack whose row is missing */
    int64_t resume;   /* the token (in walking order) to resume at */
    int64_t resume_depth;  /* and 1 + the depth its sets are kept to (0: walk it from its start) */
    uint8_t *deep;    /* [max token length + 1]: per depth, whether the walk there is deep (step_set) */
    uint32_t *walked; /* [2 * width]: a call's verdicts and deep flags, per token walked */
    int64_t resume_row;  /* loom_ebnf_cross_rows: the row to resume at */
    lalr_t *parser;      /* the grammar's stacks (lalr_native.py), which fill rows here; 0: Python fills them */
    int64_t n_pairs, pairs_cap;  /* row_pairs' pairs written, and its room */
};

/* Stack s's row, filled by the parser in C where there is room (else Python fills it: 1). */
static int fill_row(ctx_t *x, int64_t s) {
    if (!x->parser || s >= x->n_rows || x->n_pairs + x->parser->n_terms > x->pairs_cap) return 1;
    int64_t k = loom_lalr_row(x->parser, s, x->row_pairs + 2 * x->n_pairs);
    if (k < 0) return 1;  /* (out of memory: Python's fill says so) */
    x->row_off[s] = x->n_pairs;
    x->row_len[s] = (int32_t)k;
    x->n_pairs += k;
    return 0;
}

#define STEP(cur, n, b, out, deep) step_set(cur, n, b, out, x->scratch, x->scratch_cap, x->trans, x->accepting, \
    x->lex_terminal, x->offsets, x->n_lex, x->boundary, x->row_off, x->row_len, x->row_pairs, x->n_rows, mc, &x->need, \
    start / x->n_lex, deep, x)

/* Walks x->order[0..n) (from x->resume) from their byte `offset` on, from configuration `start` (a
   boundary at the stack after a lexeme end), setting the accepted ones in `allowed`, and in
   `deep_out` (when given) those whose walk went deep (step_set). Returns 0; -2 when the row of
   stack x->need is missing (fill it and call again: the walk resumes where it was); -3 when
   scratch is too small (grow it and call again, likewise). The start set's step by each first
   byte is computed once a call (the one step every token takes, and most tokens' last; never
   deep: the start is a boundary), and a token shares the sets of its previous token's common
   prefix. */
static int64_t walk_order(ctx_t *x, int64_t n, uint32_t *allowed, int64_t offset, int64_t start, const int64_t *offs,
                          uint32_t *deep_out) {
    int64_t mc = x->max_configs;
    int64_t first_len[256];
    for (int b = 0; b < 256; b++) first_len[b] = -1;
    int64_t valid = -1;  /* sets[offset .. valid] hold the previous token's walk */
    const uint8_t *prev = 0;
    int64_t prev_len = 0;
    if (x->resume_depth) {  /* back after a row was filled: the token goes on from the depth it stopped at */
        int64_t row = x->row_of[x->order[x->resume]];
        if (offs) offset = offs[x->resume];
        valid = x->resume_depth - 1;
        prev = x->data + row * x->stride;
        prev_len = x->lens[row];
        x->resume_depth = 0;
    }
    for (int64_t k = x->resume; k < n; k++) {
        if (valid < 0 || (offs && offs[k] != offset)) {  /* (offs: each token's own offset, ascending) */
            if (offs) offset = offs[k];
            x->sets[offset * mc] = start;
            x->sizes[offset] = 1;
            x->deep[offset] = 0;
            valid = offset;
            prev = 0;
        }
        int64_t t = x->order[k], row = x->row_of[t];
        const uint8_t *cur = x->data + row * x->stride;
        int64_t len = x->lens[row], d = offset;
        if (prev) {
            int64_t lim = valid < len ? valid : len;
            if (prev_len < lim) lim = prev_len;
            while (d < lim && cur[d] == prev[d]) d++;
        }
        if (d == offset) {
            int b = cur[d], ignored = 0;
            if (first_len[b] < 0) {
                int64_t r = STEP(x->sets + d * mc, 1, b, x->first + b * mc, &ignored);
                if (r < 0) {
                    x->resume = k;
                    return r;
                }
                first_len[b] = r;
            }
            memcpy(x->sets + (d + 1) * mc, x->first + b * mc, first_len[b] * sizeof(int64_t));
            x->sizes[++d] = first_len[b];
            x->deep[d] = 0;
        }
        while (d < len && x->sizes[d] > 0) {
            int deep = 0;
            int64_t r = STEP(x->sets + d * mc, x->sizes[d], cur[d], x->sets + (d + 1) * mc, &deep);
            if (r < 0) {
                x->resume = k;
                x->resume_depth = d + 1;
                return r;
            }
            x->sizes[d + 1] = r;
            x->deep[d + 1] = x->deep[d] | deep;
            d++;
        }
        uint32_t bit = (uint32_t)1 << (t & 31);
        if (d == len && x->sizes[d] > 0) allowed[t >> 5] |= bit;
        if (deep_out && x->deep[d]) deep_out[t >> 5] |= bit;
        prev = cur;
        prev_len = len;
        valid = d;
    }
    x->resume = 0;
    return 0;
}

/* The tokens of `enders` (packed words [width], or their ids ids[0..m) when ids is given: the work
   then follows the tokens, not the vocabulary's width) whose bytes from `offset` on are accepted
   from configuration `start`, a boundary at stack S: out |= them.

   Verdicts are kept. A token whose walk is shallow (every lexeme it completes is of a terminal
   that leaves S as it is, such as ignored whitespace, and the walk stays at S) read nothing of S
   but the terminals startable there and which of them leave S as it is: its verdict holds at every
   stack of that signature, and is kept in shared[0 .. 3 width) = checked, allowed, deep (per
   offset and signature). The others' are kept per stack, in own[0 .. 2 width) = checked, allowed.
   Walked: the tokens not yet checked in `shared`, and the deep ones not yet checked in `own`.
   Returns 0; 1 when more than `many` would be walked (nothing done: the caller scans instead);
   -2 / -3 as walk_order. */
int64_t loom_ebnf_cross(ctx_t *x, const uint32_t *enders, const int64_t *ids, int64_t m, uint32_t *shared, uint32_t *own,
                        uint32_t *out, int64_t offset, int64_t start, int64_t many) {
    int64_t w_n = x->width, n = 0;
    uint32_t *s_checked = shared, *s_allowed = shared + w_n, *s_deep = shared + 2 * w_n;
    uint32_t *o_checked = own, *o_allowed = own + w_n, *w_allowed = x->walked, *w_deep = x->walked + w_n;
    if (ids) {
        for (int64_t k = 0; k < m; k++) {
            int64_t t = ids[k], w = t >> 5;
            uint32_t bit = (uint32_t)1 << (t & 31);
            if ((~s_checked[w] | (s_deep[w] & ~o_checked[w])) & bit) {
                if (n >= many) return 1;
                x->order[n++] = t;
            }
        }
    } else {
        for (int64_t w = 0; w < w_n; w++) {
            uint32_t bits = enders[w] & (~s_checked[w] | (s_deep[w] & ~o_checked[w]));
            if (!bits) continue;
            if (n + __builtin_popcount(bits) > many) return 1;
            while (bits) {
                x->order[n++] = w * 32 + __builtin_ctz(bits);
                bits &= bits - 1;
            }
        }
    }
    if (x->resume == 0)  /* (a resumed call keeps the verdicts of the tokens walked before it stopped) */
        for (int64_t k = 0; k < n; k++) {
            int64_t t = x->order[k];
            w_allowed[t >> 5] &= ~((uint32_t)1 << (t & 31));
            w_deep[t >> 5] &= ~((uint32_t)1 << (t & 31));
        }
    int64_t r = walk_order(x, n, w_allowed, offset, start, 0, w_deep);
    if (r) return r;
    for (int64_t k = 0; k < n; k++) {
        int64_t t = x->order[k], w = t >> 5;
        uint32_t bit = (uint32_t)1 << (t & 31);
        if (!(s_checked[w] & bit)) {
            s_checked[w] |= bit;
            if (!(w_deep[w] & bit)) {
                s_allowed[w] |= w_allowed[w] & bit;
                continue;
            }
            s_deep[w] |= bit;
        }
        o_checked[w] |= bit;
        o_allowed[w] |= w_allowed[w] & bit;
    }
    if (ids) {
        for (int64_t k = 0; k < m; k++) {
            int64_t t = ids[k], w = t >> 5;
            out[w] |= (s_allowed[w] | (s_deep[w] & o_allowed[w])) & ((uint32_t)1 << (t & 31));
        }
    } else {
        for (int64_t w = 0; w < w_n; w++) out[w] |= enders[w] & (s_allowed[w] | (s_deep[w] & o_allowed[w]));
    }
    return 0;
}

/* loom_ebnf_cross for each of a scan's split rows at one stack, in one call: rows[6 r ..) = (enders,
   ids, their count, shared, own, offset) as loom_ebnf_cross takes them (addresses as int64; ids 0:
   by the packed words). A row with more than `many` to walk is skipped and flagged in
   many_out[r] (the caller scans it). Returns 0; -2 / -3 as walk_order (call again: it resumes at
   the row it stopped in, x->resume_row). */
int64_t loom_ebnf_cross_rows(ctx_t *x, const int64_t *rows, int64_t k, uint32_t *out, int64_t start, int64_t many,
                             uint8_t *many_out) {
    for (int64_t r = x->resume_row; r < k; r++) {
        const int64_t *q = rows + 6 * r;
        int64_t a = loom_ebnf_cross(x, (const uint32_t *)q[0], (const int64_t *)q[1], q[2], (uint32_t *)q[3],
                                    (uint32_t *)q[4], out, q[5], start, many);
        if (a < 0) {
            x->resume_row = r;
            return a;
        }
        many_out[r] = (uint8_t)a;
    }
    x->resume_row = 0;
    return 0;
}

/* The tokens ids[0..m) (m at most the vocabulary), each walked from its own offset offs[k]
   (ascending): those accepted from configuration `start` are set in `out`, and those whose walk
   went deep in `deep` (when given). Returns 0; -2 / -3 as walk_order (call again: it resumes). A
   scan's listed rows (a string's closing-quote rows) at a new stack, in one call. */
int64_t loom_ebnf_cross_list(ctx_t *x, const int64_t *ids, const int64_t *offs, int64_t m, uint32_t *out, int64_t start,
                             uint32_t *deep) {
    memcpy(x->order, ids, m * sizeof(int64_t));
    return walk_order(x, m, out, 0, start, offs, deep);
}
"""


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


class _Ctx(ctypes.Structure):
    """The C side's view of a CrossingWalker (ctx_t): pointers into its arrays, reset on growth."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("trans", "accepting", "lex_terminal", "offsets")]
    _fields_ += [("n_lex", ctypes.c_int64), ("boundary", ctypes.c_int64)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("row_off", "row_len", "row_pairs")] + [("n_rows", ctypes.c_int64)]
    _fields_ += [("data", ctypes.c_void_p), ("stride", ctypes.c_int64)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("lens", "row_of")]
    _fields_ += [("width", ctypes.c_int64), ("max_configs", ctypes.c_int64)]
    _fields_ += [(name, ctypes.c_void_p) for name in ("sets", "sizes", "scratch")] + [("scratch_cap", ctypes.c_int64)]
    _fields_ += [("order", ctypes.c_void_p), ("first", ctypes.c_void_p), ("need", ctypes.c_int64), ("resume", ctypes.c_int64)]
    _fields_ += [("resume_depth", ctypes.c_int64)]
    _fields_ += [("deep", ctypes.c_void_p), ("walked", ctypes.c_void_p), ("resume_row", ctypes.c_int64)]
    _fields_ += [("parser", ctypes.c_void_p), ("n_pairs", ctypes.c_int64), ("pairs_cap", ctypes.c_int64)]


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_NO_C_EBNF"):
        return None
    lib = compile_c(_C_SOURCE, "loom_ebnf_walk", "the EBNF crossing walk")
    if lib is None:
        return None
    lib.loom_ebnf_cross.restype = ctypes.c_int64
    lib.loom_ebnf_cross.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    lib.loom_ebnf_cross.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.loom_ebnf_cross_list.restype = ctypes.c_int64
    lib.loom_ebnf_cross_list.argtypes = [ctypes.POINTER(_Ctx)] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    lib.loom_ebnf_cross_list.argtypes += [ctypes.c_void_p]
    lib.loom_ebnf_cross_rows.restype = ctypes.c_int64
    lib.loom_ebnf_cross_rows.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.loom_ebnf_cross_rows.argtypes += [ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    bind_lalr(lib)
    return lib


def available() -> bool:
    return _library() is not None


def native_stacks(*table: Any) -> NativeStacks | None:
    """A grammar's stacks in C (lalr_native.NativeStacks(lib, *table)), whose rows the crossing
    walk fills itself; None where the library is not compiled."""
    lib = _library()
    return NativeStacks(lib, *table) if lib is not None else None


class CrossingWalker:
    """One compiled grammar's lexer table as C reads it, and the parser rows filled so far."""

    def __init__(self, grammar: CompiledEbnf) -> None:
        self.g = grammar
        self.lib = _library()
        v = grammar.vocab
        self.row_of = token_rows(v)
        self.trans = np.ascontiguousarray(grammar.trans_table, dtype=np.int32)  # [boundary, 256]
        self.accepting = np.asarray(grammar.accepting, dtype=np.uint8)
        self.lex_terminal = np.asarray(grammar.lex_terminal, dtype=np.int32)
        self.offsets = np.asarray(grammar.offsets, dtype=np.int32)
        self.row_off = np.full(64, -1, dtype=np.int64)  # [capacity] per stack; -1: row not filled
        self.row_len = np.zeros(64, dtype=np.int32)
        self.pairs = np.zeros(256, dtype=np.int32)  # (terminal, stack after) pairs, rows one after another (ctx.n_pairs of them)
        self.data = np.ascontiguousarray(v.data)
        self.lens = np.ascontiguousarray(v.lens, dtype=np.int64)
        self.sets = np.zeros((self.data.shape[1] + 1) * grammar.max_configs, dtype=np.int64)
        self.sizes = np.zeros(self.data.shape[1] + 1, dtype=np.int64)
        self.scratch = np.zeros(4 * grammar.max_configs, dtype=np.int64)  # grown when a step finds more
        self.order = np.zeros(v.vocab_size, dtype=np.int64)
        self.first = np.zeros(256 * grammar.max_configs, dtype=np.int64)
        self.deep = np.zeros(self.data.shape[1] + 1, dtype=np.uint8)
        self.walked = np.zeros(2 * bitmask_width(v.vocab_size), dtype=np.uint32)
        self.ctx = _Ctx(
            _ptr(self.trans), _ptr(self.accepting), _ptr(self.lex_terminal), _ptr(self.offsets), grammar.n_lex, grammar.boundary,
            _ptr(self.row_off), _ptr(self.row_len), _ptr(self.pairs), len(self.row_off),
            _ptr(self.data), self.data.shape[1], _ptr(self.lens), _ptr(self.row_of),
            bitmask_width(v.vocab_size), grammar.max_configs, _ptr(self.sets), _ptr(self.sizes), _ptr(self.scratch),
            len(self.scratch), _ptr(self.order), _ptr(self.first), 0, 0, 0, _ptr(self.deep), _ptr(self.walked), 0,
            grammar.stacks.handle if grammar.stacks is not None else None, 0, len(self.pairs) // 2,
        )  # fmt: skip
        self.ctx_ref = ctypes.byref(self.ctx)
        self.stacks = grammar.stacks  # (held: ctx.parser points into it)

    @property
    def nbytes(self) -> int:
        """The walk's buffers and parser rows (counted in the compiled grammar's size)."""
        arrays = (self.trans, self.row_off, self.row_len, self.pairs, self.sets, self.sizes, self.scratch, self.order, self.first, self.walked)
        return sum(a.nbytes for a in arrays)

    def _fill(self, sid: int) -> None:
        """Stack `sid`'s row: each terminal a lexeme may be of there, and the stack after one."""
        g = self.g
        if sid >= len(self.row_off):
            cap = max(2 * len(self.row_off), sid + 1)
            self.row_off = np.concatenate([self.row_off, np.full(cap - len(self.row_off), -1, dtype=np.int64)])
            self.row_len = np.concatenate([self.row_len, np.zeros(cap - len(self.row_len), dtype=np.int32)])
            self.ctx.row_off, self.ctx.row_len, self.ctx.n_rows = _ptr(self.row_off), _ptr(self.row_len), cap
        row = [(t, g.after(sid, t)) for t in g.startable(sid)]
        n = self.ctx.n_pairs
        room = max(len(row), len(g.terminal_names) + 1)  # (and for a row the C parser fills next)
        if 2 * (n + room) > len(self.pairs):
            self.pairs = np.concatenate([self.pairs, np.zeros(max(len(self.pairs), 2 * room), dtype=np.int32)])
            self.ctx.row_pairs, self.ctx.pairs_cap = _ptr(self.pairs), len(self.pairs) // 2
        self.pairs[2 * n : 2 * (n + len(row))] = np.asarray(row, dtype=np.int32).reshape(-1)
        self.row_off[sid], self.row_len[sid] = n, len(row)
        self.ctx.n_pairs = n + len(row)

    def cross(
        self, offset: int, sid: int, enders: np.ndarray, shared: np.ndarray, own: np.ndarray, out: np.ndarray, many: int,
        ids: np.ndarray | None = None,
    ) -> bool:
        """out |= the tokens of `enders` (packed [width] uint32) whose bytes from `offset` on are
        accepted from a lexeme boundary at stack `sid`. Verdicts are kept in `shared` ([3 width]
        uint32: checked, allowed, deep; for every stack of sid's signature, CompiledEbnf.signature)
        and `own` ([2 width]: checked, allowed; sid's own, for the tokens whose walk reads more of
        the stack), and only the tokens neither holds are walked. False (nothing done) when more
        than `many` would be. `ids`: enders' token ids (distinct int64) where the caller has them:
        the walk then reads those tokens' bits only, not every word."""
        width = self.ctx.width
        assert len(enders) == width and shared.shape == (3 * width,) and own.shape == (2 * width,) and out.shape == (width,)
        ids_at = (_ptr(ids), len(ids)) if ids is not None else None
        return self.cross_at(offset, sid, _ptr(np.ascontiguousarray(enders)), _ptr(shared), _ptr(own), _ptr(out), many, ids_at)

    def cross_at(
        self, offset: int, sid: int, enders: int, shared: int, own: int, out: int, many: int, ids: tuple[int, int] | None
    ) -> bool:
        """`cross` given its arrays' data addresses (ids: (address, count)): a caller that keeps
        them saves ~2 µs an array, and a mask may cross dozens of rows."""
        start = sid * self.g.n_lex + self.g.boundary
        listed = ids if ids is not None else (0, 0)
        return self._until_done(self.lib.loom_ebnf_cross, (enders, *listed, shared, own, out, offset, start, many)) == 0

    def cross_rows(self, sid: int, rows: np.ndarray, out: np.ndarray, many: int) -> np.ndarray:
        """`cross_at` for each row of `rows` ([k, 6] int64: enders, ids, their count, shared, own,
        offset; ids 0: by the packed enders) at stack `sid`, in one call (a scan's dozens of split
        rows cost one C call, not dozens of Python ones). -> per row, whether it had more than
        `many` tokens to walk (nothing done there: the caller scans)."""
        assert rows.dtype == np.int64 and rows.flags.c_contiguous and rows.shape[1] == 6 and out.shape == (self.ctx.width,)
        skipped = np.zeros(len(rows), dtype=np.uint8)
        start = sid * self.g.n_lex + self.g.boundary
        self._until_done(self.lib.loom_ebnf_cross_rows, (_ptr(rows), len(rows), _ptr(out), start, many, _ptr(skipped)))
        return skipped

    def cross_list(self, sid: int, listed: tuple[int, int, int], out: np.ndarray, deep: np.ndarray | None = None) -> None:
        """out |= the tokens of `listed` (the addresses of their ids and of their offsets,
        ascending, and their count) whose bytes from their offset on are accepted from a lexeme
        boundary at stack `sid`: one call for rows at several offsets (no memo of verdicts).
        deep |= those whose walk read more of the stack than its signature (see `cross`)."""
        assert listed[2] <= len(self.order)
        start = sid * self.g.n_lex + self.g.boundary
        self._until_done(self.lib.loom_ebnf_cross_list, (*listed, _ptr(out), start, _ptr(deep) if deep is not None else 0))

    def _until_done(self, fn: Any, args: tuple) -> int:
        """fn(ctx, *args), called again after each row it lacks is filled (-2) or its scratch
        grown (-3): the walk resumes where it stopped, the token it stopped on from the depth it
        reached (a token of parentheses opens a new stack, so a new row, at every byte). -> its
        final answer."""
        try:
            while True:
                r = fn(self.ctx_ref, *args)
                if r == -2:
                    self._fill(self.ctx.need)
                elif r == -3:
                    self.scratch = np.zeros(2 * len(self.scratch), dtype=np.int64)
                    self.ctx.scratch, self.ctx.scratch_cap = _ptr(self.scratch), len(self.scratch)
                else:
                    return r
        except BaseException:  # (a row that could not be filled: the next walk starts afresh)
            self.ctx.resume = self.ctx.resume_depth = self.ctx.resume_row = 0
            raise

    def accepted(self, offset: int, sid: int, ids: np.ndarray, by_ids: bool = False) -> np.ndarray:
        """The token ids of `ids` (each longer than `offset`) whose bytes from `offset` on are
        accepted from a lexeme boundary at stack `sid` (ebnf_masks' `_accepted_from`); by_ids:
        crossed from their ids rather than their packed words."""
        v = self.g.vocab
        enders = v.pack(ids)
        out, shared, own = np.zeros_like(enders), np.zeros(3 * len(enders), dtype=np.uint32), np.zeros(2 * len(enders), dtype=np.uint32)
        listed = np.unique(np.asarray(ids, dtype=np.int64)) if by_ids else None
        self.cross(offset, sid, enders, shared, own, out, len(ids), listed)
        return unpack_ids(out)
