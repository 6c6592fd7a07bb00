"""The EBNF engine's walk of tokens that cross a lexeme end, in C when a compiler is at hand.

    walker = CrossingWalker(compiled)       once per compiled grammar (None-returning without C)
    ids = walker.accepted(offset, sid, ids) the token ids whose bytes from `offset` on are accepted
                                            from a lexeme boundary at stack `sid`

This is ebnf_masks' `_accepted_from` (a Python walk of each token's remainder, one memoised parser
step per byte) done in C, where a new position costs ~10 µs per byte in Python: a remainder is
stepped as a set of configurations (stack * n_lex + lexer state) through the lexer's table, and a
lexeme end looks up the stack after it in the stack's row. The rows are the parser's part, and they
stay in Python: a row lists, per interned stack, the terminals a lexeme may be of there and the
stack once one is complete (CompiledEbnf.startable / after). C asks for a row it lacks by returning
the stack's id; Python fills it (interning new stacks as Lark's LALR table says) and C resumes at
the token it stopped on, so the C walk is the Python one, set by set, MAX_CONFIGS truncation
included.

LOOM_NO_C_EBNF=1 turns the C walk off (the Python walk stays).
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from loom.runtime.constrained.bitmask import bitmask_width
from loom.runtime.constrained.native_c import compile_c
from loom.runtime.constrained.vocabulary import token_rows

if TYPE_CHECKING:
    from loom.runtime.constrained.ebnf import CompiledEbnf

_C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Rows: stack sid's row is row_pairs[2 * row_off[sid] ..) of row_len[sid] (terminal, stack after)
   pairs sorted by terminal; row_off[sid] < 0 (or sid >= n_rows) means not filled yet. */
#define NEED(s) do { if ((s) >= n_rows || row_off[s] < 0) { *need = (s); return -2; } } while (0)

/* One step of the sorted set cur[0..n) by byte b into out (sorted, unique, at most max_configs
   smallest kept); returns its size, or -2 with *need set when a row is missing. */
static int64_t step_set(const int64_t *cur, int64_t n, int b, int64_t *out, int64_t *scratch, int64_t scratch_cap,
                        const int32_t *trans, const uint8_t *accepting, const int32_t *lex_terminal,
                        const int32_t *offsets, int64_t n_lex, int64_t boundary, const int64_t *row_off,
                        const int32_t *row_len, const int32_t *row_pairs, int64_t n_rows, int64_t max_configs,
                        int64_t *need) {
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

typedef struct {
    const int32_t *trans; const uint8_t *accepting; const int32_t *lex_terminal; const int32_t *offsets;
    int64_t n_lex, boundary;
    const int64_t *row_off; const int32_t *row_len; const int32_t *row_pairs; int64_t n_rows;
    const uint8_t *data; int64_t stride; const int64_t *lens; const int64_t *row_of;
    int64_t width, max_configs;
    int64_t *sets, *sizes, *scratch; int64_t scratch_cap;
    int64_t *order;   /* [vocab_size]: the tokens to walk */
    int64_t *first;   /* [256 * max_configs]: the start set stepped by each byte (first_len: -1 not yet) */
    int64_t need;     /* the stack whose row is missing */
    int64_t resume;   /* the token (in walking order) to resume at */
} ctx_t;

/* Walks x->order[0..n) (from x->resume) from their byte `offset` on, from configuration `start` (a
   boundary at the stack after a lexeme end), setting the accepted ones in `allowed`. Returns 0; -2
   when the row of stack x->need is missing (fill it and call again: the walk resumes where it
   was); -3 when scratch is too small (grow it and call again, likewise). The start set's step by
   each first byte is computed once a call (the one step every token takes, and most tokens'
   last), and a token shares the sets of its previous token's common prefix. */
static int64_t walk_order(ctx_t *x, int64_t n, uint32_t *allowed, int64_t offset, int64_t start, const int64_t *offs) {
    int64_t mc = x->max_configs;
    int64_t first_len[256];
    for (int b = 0; b < 256; b++) first_len[b] = -1;
    int64_t valid = -1;  /* sets[offset .. valid] hold the previous token's walk */
    const uint8_t *prev = 0;
    int64_t prev_len = 0;
    for (int64_t k = x->resume; k < n; k++) {
        if (valid < 0 || (offs && offs[k] != offset)) {  /* (offs: each token's own offset, ascending) */
            if (offs) offset = offs[k];
            x->sets[offset * mc] = start;
            x->sizes[offset] = 1;
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
            int b = cur[d];
            if (first_len[b] < 0) {
                int64_t r = step_set(x->sets + d * mc, 1, b, x->first + b * mc, x->scratch, x->scratch_cap, x->trans,
                                     x->accepting, x->lex_terminal, x->offsets, x->n_lex, x->boundary, x->row_off,
                                     x->row_len, x->row_pairs, x->n_rows, mc, &x->need);
                if (r < 0) {
                    x->resume = k;
                    return r;
                }
                first_len[b] = r;
            }
            memcpy(x->sets + (d + 1) * mc, x->first + b * mc, first_len[b] * sizeof(int64_t));
            x->sizes[++d] = first_len[b];
        }
        while (d < len && x->sizes[d] > 0) {
            int64_t r = step_set(x->sets + d * mc, x->sizes[d], cur[d], x->sets + (d + 1) * mc, x->scratch,
                                 x->scratch_cap, x->trans, x->accepting, x->lex_terminal, x->offsets, x->n_lex,
                                 x->boundary, x->row_off, x->row_len, x->row_pairs, x->n_rows, mc, &x->need);
            if (r < 0) {
                x->resume = k;
                return r;
            }
            x->sizes[++d] = r;
        }
        if (d == len && x->sizes[d] > 0) allowed[t >> 5] |= (uint32_t)1 << (t & 31);
        prev = cur;
        prev_len = len;
        valid = d;
    }
    x->resume = 0;
    return 0;
}

/* Packed words [width]: the tokens of `enders` not yet `checked` are walked (walk_order, in id
   order); those accepted are set in `allowed`, all of them in `checked`, and out |= allowed &
   enders. Returns 0; 1 when more than `many` are new (nothing done: the caller scans instead);
   -2 / -3 as walk_order. */
int64_t loom_ebnf_cross(ctx_t *x, const uint32_t *enders, uint32_t *checked, uint32_t *allowed, uint32_t *out,
                        int64_t offset, int64_t start, int64_t many) {
    int64_t n = 0;
    for (int64_t w = 0; w < x->width; w++) {
        uint32_t bits = enders[w] & ~checked[w];
        if (!bits) continue;
        if (n + __builtin_popcount(bits) > many) return 1;
        while (bits) {
            x->order[n++] = w * 32 + __builtin_ctz(bits);
            bits &= bits - 1;
        }
    }
    int64_t r = walk_order(x, n, allowed, offset, start, 0);
    if (r) return r;
    for (int64_t w = 0; w < x->width; w++) {
        checked[w] |= enders[w];
        out[w] |= allowed[w] & enders[w];
    }
    return 0;
}

/* loom_ebnf_cross for enders given as their token ids ids[0..m) (distinct): the work follows the
   tokens, not the vocabulary's width (a string's split rows hold a few hundred tokens each). */
int64_t loom_ebnf_cross_ids(ctx_t *x, const int64_t *ids, int64_t m, uint32_t *checked, uint32_t *allowed, uint32_t *out,
                            int64_t offset, int64_t start, int64_t many) {
    int64_t n = 0;
    for (int64_t k = 0; k < m; k++) {
        int64_t t = ids[k];
        if (checked[t >> 5] >> (t & 31) & 1) continue;
        if (n >= many) return 1;
        x->order[n++] = t;
    }
    int64_t r = walk_order(x, n, allowed, offset, start, 0);
    if (r) return r;
    for (int64_t k = 0; k < m; k++) {
        int64_t t = ids[k];
        uint32_t bit = (uint32_t)1 << (t & 31);
        checked[t >> 5] |= bit;
        out[t >> 5] |= allowed[t >> 5] & bit;
    }
    return 0;
}

/* The tokens ids[0..m) (m at most the vocabulary), each walked from its own offset offs[k]
   (ascending): those accepted from configuration `start` are set in `out`. Returns 0; -2 / -3 as
   walk_order (call again: it resumes). A string's closing-quote rows at a new stack, in one call. */
int64_t loom_ebnf_cross_list(ctx_t *x, const int64_t *ids, const int64_t *offs, int64_t m, uint32_t *out, int64_t start) {
    memcpy(x->order, ids, m * sizeof(int64_t));
    return walk_order(x, m, out, 0, start, offs);
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


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("LOOM_NO_C_EBNF"):
        return None
    lib = compile_c(_C_SOURCE, "loom_ebnf_walk", "the EBNF crossing walk")
    if lib is None:
        return None
    lib.loom_ebnf_cross.restype = ctypes.c_int64
    lib.loom_ebnf_cross.argtypes = [ctypes.POINTER(_Ctx)] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3
    lib.loom_ebnf_cross_ids.restype = ctypes.c_int64
    lib.loom_ebnf_cross_ids.argtypes = [ctypes.POINTER(_Ctx), ctypes.c_void_p, ctypes.c_int64]
    lib.loom_ebnf_cross_ids.argtypes += [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
    lib.loom_ebnf_cross_list.restype = ctypes.c_int64
    lib.loom_ebnf_cross_list.argtypes = [ctypes.POINTER(_Ctx)] + [ctypes.c_void_p] * 2 + [ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    return lib


def available() -> bool:
    return _library() is not None


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
        self.pairs = np.zeros(256, dtype=np.int32)  # (terminal, stack after) pairs, rows one after another
        self.n_pairs = 0
        self.data = np.ascontiguousarray(v.data)
        self.lens = np.ascontiguousarray(v.lens, dtype=np.int64)
        self.sets = np.zeros((self.data.shape[1] + 1) * grammar.max_configs, dtype=np.int64)
        self.sizes = np.zeros(self.data.shape[1] + 1, dtype=np.int64)
        self.scratch = np.zeros(4 * grammar.max_configs, dtype=np.int64)  # grown when a step finds more
        self.order = np.zeros(v.vocab_size, dtype=np.int64)
        self.first = np.zeros(256 * grammar.max_configs, dtype=np.int64)
        self.ctx = _Ctx(
            _ptr(self.trans), _ptr(self.accepting), _ptr(self.lex_terminal), _ptr(self.offsets), grammar.n_lex, grammar.boundary,
            _ptr(self.row_off), _ptr(self.row_len), _ptr(self.pairs), len(self.row_off),
            _ptr(self.data), self.data.shape[1], _ptr(self.lens), _ptr(self.row_of),
            bitmask_width(v.vocab_size), grammar.max_configs, _ptr(self.sets), _ptr(self.sizes), _ptr(self.scratch),
            len(self.scratch), _ptr(self.order), _ptr(self.first), 0, 0,
        )  # fmt: skip
        self.ctx_ref = ctypes.byref(self.ctx)

    @property
    def nbytes(self) -> int:
        """The walk's buffers and parser rows (counted in the compiled grammar's size)."""
        arrays = (self.trans, self.row_off, self.row_len, self.pairs, self.sets, self.sizes, self.scratch, self.order, self.first)
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
        n = self.n_pairs
        if 2 * (n + len(row)) > len(self.pairs):
            self.pairs = np.concatenate([self.pairs, np.zeros(max(len(self.pairs), 2 * len(row)), dtype=np.int32)])
            self.ctx.row_pairs = _ptr(self.pairs)
        self.pairs[2 * n : 2 * (n + len(row))] = np.asarray(row, dtype=np.int32).reshape(-1)
        self.row_off[sid], self.row_len[sid] = n, len(row)
        self.n_pairs = n + len(row)

    def cross(
        self,
        offset: int,
        sid: int,
        enders: np.ndarray,
        checked: np.ndarray,
        allowed: np.ndarray,
        out: np.ndarray,
        many: int,
        ids: np.ndarray | None = None,
    ) -> bool:
        """The tokens of `enders` (packed [width] uint32) not yet in `checked` whose bytes from
        `offset` on are accepted from a lexeme boundary at stack `sid` are added to `allowed`, all
        of them to `checked`, and out |= allowed & enders. False (nothing done) when more than
        `many` are new. `ids`: enders' token ids (distinct int64) where the caller has them: the
        walk then reads those tokens' bits only, not every word."""
        ids_at = (_ptr(ids), len(ids)) if ids is not None else None
        return self.cross_at(offset, sid, _ptr(np.ascontiguousarray(enders)), _ptr(checked), _ptr(allowed), _ptr(out), many, ids_at)

    def cross_at(
        self, offset: int, sid: int, enders: int, checked: int, allowed: int, out: int, many: int, ids: tuple[int, int] | None
    ) -> bool:
        """`cross` given its arrays' data addresses (ids: (address, count)): a caller that keeps
        them saves ~2 µs an array, and a mask may cross dozens of rows."""
        start = sid * self.g.n_lex + self.g.boundary
        if ids is not None:
            fn, args = self.lib.loom_ebnf_cross_ids, (*ids, checked, allowed, out, offset, start, many)
        else:
            fn, args = self.lib.loom_ebnf_cross, (enders, checked, allowed, out, offset, start, many)
        return self._until_done(fn, args) == 0

    def cross_list(self, sid: int, listed: tuple[int, int, int], out: np.ndarray) -> None:
        """out |= the tokens of `listed` (the addresses of their ids and of their offsets,
        ascending, and their count) whose bytes from their offset on are accepted from a lexeme
        boundary at stack `sid`: one call for rows at several offsets (no memo of verdicts)."""
        assert listed[2] <= len(self.order)
        self._until_done(self.lib.loom_ebnf_cross_list, (*listed, out.ctypes.data, sid * self.g.n_lex + self.g.boundary))

    def _until_done(self, fn: Any, args: tuple) -> int:
        """fn(ctx, *args), called again after each row it lacks is filled (-2) or its scratch
        grown (-3): the walk resumes where it stopped. -> its final answer."""
        while True:
            r = fn(self.ctx_ref, *args)
            if r == -2:
                self._fill(self.ctx.need)
            elif r == -3:
                self.scratch = np.zeros(2 * len(self.scratch), dtype=np.int64)
                self.ctx.scratch, self.ctx.scratch_cap = _ptr(self.scratch), len(self.scratch)
            else:
                return r

    def accepted(self, offset: int, sid: int, ids: np.ndarray, by_ids: bool = False) -> np.ndarray:
        """The token ids of `ids` (each longer than `offset`) whose bytes from `offset` on are
        accepted from a lexeme boundary at stack `sid` (ebnf_masks' `_accepted_from`); by_ids:
        crossed from their ids rather than their packed words."""
        v = self.g.vocab
        enders = v.pack(ids)
        allowed, out = np.zeros_like(enders), np.zeros_like(enders)
        listed = np.unique(np.asarray(ids, dtype=np.int64)) if by_ids else None
        self.cross(offset, sid, enders, np.zeros_like(enders), allowed, out, len(ids), listed)
        bits = np.unpackbits(allowed.view(np.uint8), bitorder="little")[: v.vocab_size]
        return np.flatnonzero(bits).astype(np.int64)
