"""An EBNF grammar's parser stacks in C: its LALR table as dense arrays, and the stacks interned.

    stacks = NativeStacks(lib, grammar's table)   (lib: ebnf_walk's library, which compiles C_SOURCE)
    stacks.feed(sid, terminal) -> sid | -1        the stack after a lexeme of `terminal` (reducing
                                                  first, as LALR does); -1: not acceptable here
    stacks.top(sid), stacks.count
    stacks.top_frames(sid, k) -> sid'             sid's top k frames, standing for every stack
                                                  with them (BottomRead where that is not enough)

A stack is interned as (parent id, top state), so equal stacks are one id. CompiledEbnf keeps them
in Python lists where there is no C compiler; here they live in C so that the crossing walk
(ebnf_walk.py) fills a new stack's parser row itself: a row is the terminals a lexeme may be of at
the stack and the stack after each, and filling one in Python cost 10-30 µs (an arithmetic
grammar's run of parentheses opens a stack per byte, dozens a mask). Both intern stacks alike
(ids in the order stacks are met).
"""

from __future__ import annotations

import ctypes
import weakref
from typing import Any

import numpy as np

C_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int32_t n_terms, n_nt, end_term, end_state;
    int32_t bottom;    /* a state beyond the table: the frame under a stack's top frames (loom_lalr_top_frames) */
    int32_t *action;   /* [states * n_terms]: 0 none, s + 1 shift to s, -(r + 1) reduce by rule r */
    int32_t *go;       /* [states * n_nt]: the state after a nonterminal (-1 none) */
    int32_t *rule_nt, *rule_len;
    uint8_t *ignored;  /* [n_terms]: a lexeme of it leaves the stack as it is */
    int32_t *top, *parent;
    int64_t n, cap;
    uint64_t *hkey;    /* open addressing: (parent + 1) << 32 | top, 0 empty */
    int64_t *hval, hcap;
} lalr_t;

static uint64_t mix(uint64_t k) {
    k ^= k >> 33; k *= 0xff51afd7ed558ccdULL; k ^= k >> 33;
    return k;
}

static int rehash(lalr_t *p, int64_t cap) {
    uint64_t *keys = calloc(cap, sizeof(uint64_t));
    int64_t *vals = malloc(cap * sizeof(int64_t));
    if (!keys || !vals) { free(keys); free(vals); return -1; }
    for (int64_t i = 0; i < p->hcap; i++) {
        if (!p->hkey[i]) continue;
        uint64_t j = mix(p->hkey[i]) & (cap - 1);
        while (keys[j]) j = (j + 1) & (cap - 1);
        keys[j] = p->hkey[i];
        vals[j] = p->hval[i];
    }
    free(p->hkey); free(p->hval);
    p->hkey = keys; p->hval = vals; p->hcap = cap;
    return 0;
}

/* The id of stack (parent, state), interned on first sight; -3 when memory ran out. */
static int64_t lalr_push(lalr_t *p, int64_t parent, int32_t state) {
    if (2 * (p->n + 1) > p->hcap && rehash(p, 2 * p->hcap)) return -3;
    uint64_t key = ((uint64_t)(parent + 1) << 32) | (uint32_t)state;
    uint64_t i = mix(key) & (p->hcap - 1);
    while (p->hkey[i]) {
        if (p->hkey[i] == key) return p->hval[i];
        i = (i + 1) & (p->hcap - 1);
    }
    if (p->n == p->cap) {
        int32_t *top = realloc(p->top, 2 * p->cap * sizeof(int32_t));
        if (!top) return -3;
        p->top = top;
        int32_t *par = realloc(p->parent, 2 * p->cap * sizeof(int32_t));
        if (!par) return -3;
        p->parent = par;
        p->cap *= 2;
    }
    int64_t sid = p->n++;
    p->top[sid] = state;
    p->parent[sid] = (int32_t)parent;
    p->hkey[i] = key;
    p->hval[i] = sid;
    return sid;
}

/* The stack after a lexeme of `term` at stack sid (reductions first, then the shift); for the end
   marker, the stack once reduced to the end state. -1: not acceptable; -3: out of memory; -4: the
   answer reads the frame under a stack of top frames (loom_lalr_top_frames), which stands for
   frames not kept. */
int64_t loom_lalr_feed(lalr_t *p, int64_t sid, int32_t term) {
    for (;;) {
        if (p->top[sid] == p->bottom) return -4;
        int32_t a = p->action[(int64_t)p->top[sid] * p->n_terms + term];
        if (a == 0) return -1;
        if (a > 0) return lalr_push(p, sid, a - 1);
        int32_t r = -a - 1;
        for (int32_t k = 0; k < p->rule_len[r]; k++) {
            sid = p->parent[sid];
            if (p->top[sid] == p->bottom) return -4;
        }
        int32_t g = p->go[(int64_t)p->top[sid] * p->n_nt + p->rule_nt[r]];
        if (g < 0) return -1;
        sid = lalr_push(p, sid, g);
        if (sid < 0) return sid;
        if (term == p->end_term && p->top[sid] == p->end_state) return sid;
    }
}

/* Stack sid's parser row into pairs[0 ..): (terminal, stack after) for each terminal a lexeme may be
   of there, ascending (the end marker excluded; an ignored terminal leaves sid). -> the pairs
   written; -3: out of memory; -4 as loom_lalr_feed. pairs has room for n_terms pairs. */
int64_t loom_lalr_row(lalr_t *p, int64_t sid, int32_t *pairs) {
    int64_t k = 0;
    for (int32_t t = 0; t < p->n_terms; t++) {
        if (t == p->end_term) continue;
        int64_t after = p->ignored[t] ? sid : loom_lalr_feed(p, sid, t);
        if (after < -1) return after;
        if (after < 0) continue;
        pairs[2 * k] = t;
        pairs[2 * k + 1] = (int32_t)after;
        k++;
    }
    return k;
}

/* Stack sid's top k frames on a bottom frame that reads as no state (loom_lalr_feed's -4): the stack
   that answers as sid does wherever the answer reads no deeper. sid itself when it has at most k
   frames; -3: out of memory. */
int64_t loom_lalr_top_frames(lalr_t *p, int64_t sid, int64_t k) {
    int32_t states[256];
    if (k > 256) k = 256;
    int64_t n = 0, s = sid;
    while (s >= 0 && n <= k) {
        if (p->top[s] == p->bottom) return sid;  /* (already a stack of top frames) */
        if (n < k) states[n] = p->top[s];
        n++;
        s = p->parent[s];
    }
    if (n <= k) return sid;
    int64_t out = lalr_push(p, -1, p->bottom);
    for (int64_t i = k - 1; i >= 0 && out >= 0; i--) out = lalr_push(p, out, states[i]);
    return out;
}

static void *copy(const void *src, size_t bytes) {
    void *out = malloc(bytes ? bytes : 1);
    if (out && bytes) memcpy(out, src, bytes);
    return out;
}

void loom_lalr_free(lalr_t *p) {
    if (!p) return;
    free(p->action); free(p->go); free(p->rule_nt); free(p->rule_len); free(p->ignored);
    free(p->top); free(p->parent); free(p->hkey); free(p->hval);
    free(p);
}

lalr_t *loom_lalr_new(int64_t n_states, int32_t n_terms, int32_t n_nt, int64_t n_rules, const int32_t *action,
                      const int32_t *go, const int32_t *rule_nt, const int32_t *rule_len, const uint8_t *ignored,
                      int32_t end_term, int32_t end_state, int32_t start_state) {
    lalr_t *p = calloc(1, sizeof(lalr_t));
    if (!p) return 0;
    p->n_terms = n_terms; p->n_nt = n_nt; p->end_term = end_term; p->end_state = end_state;
    p->bottom = (int32_t)n_states;
    p->action = copy(action, n_states * n_terms * sizeof(int32_t));
    p->go = copy(go, n_states * n_nt * sizeof(int32_t));
    p->rule_nt = copy(rule_nt, n_rules * sizeof(int32_t));
    p->rule_len = copy(rule_len, n_rules * sizeof(int32_t));
    p->ignored = copy(ignored, n_terms);
    p->cap = 64; p->hcap = 128;
    p->top = malloc(p->cap * sizeof(int32_t));
    p->parent = malloc(p->cap * sizeof(int32_t));
    p->hkey = calloc(p->hcap, sizeof(uint64_t));
    p->hval = malloc(p->hcap * sizeof(int64_t));
    if (!p->action || !p->go || !p->rule_nt || !p->rule_len || !p->ignored || !p->top || !p->parent || !p->hkey || !p->hval) {
        loom_lalr_free(p);
        return 0;
    }
    p->top[0] = start_state;  /* stack 0: the start (interned by no key, as CompiledEbnf's lists do) */
    p->parent[0] = -1;
    p->n = 1;
    return p;
}

int64_t loom_lalr_top(const lalr_t *p, int64_t sid) { return p->top[sid]; }
int64_t loom_lalr_count(const lalr_t *p) { return p->n; }
int64_t loom_lalr_nbytes(const lalr_t *p) { return p->cap * 8 + p->hcap * 16; }
"""


class BottomRead(Exception):
    """A question about a stack of top frames (NativeStacks.top_frames) read under them: only the
    whole stack answers it."""


def bind(lib: Any) -> None:
    """Declare the functions of C_SOURCE on the library compiled from it."""
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.loom_lalr_new.restype = ptr
    lib.loom_lalr_new.argtypes = [i64, i32, i32, i64, ptr, ptr, ptr, ptr, ptr, i32, i32, i32]
    lib.loom_lalr_free.argtypes = [ptr]
    lib.loom_lalr_free.restype = None
    signatures = {"loom_lalr_feed": [ptr, i64, i32], "loom_lalr_row": [ptr, i64, ptr], "loom_lalr_top": [ptr, i64],
                  "loom_lalr_top_frames": [ptr, i64, i64],
                  "loom_lalr_count": [ptr], "loom_lalr_nbytes": [ptr]}  # fmt: skip
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = i64


class NativeStacks:
    """One compiled grammar's LALR table and interned stacks, in C (freed with this object)."""

    def __init__(
        self,
        lib: Any,
        actions: dict[int, dict[int, tuple[bool, Any]]],
        goto: dict[int, dict[str, int]],
        n_terms: int,
        ignored: frozenset[int],
        start_state: int,
        end_state: int,
    ) -> None:
        """actions: state -> terminal -> (shift?, next state | (nonterminal, rule size)), the end
        marker the last terminal (n_terms - 1); goto: state -> nonterminal -> state."""
        n_states = max([*actions, *goto, start_state, end_state]) + 1
        names = sorted({name for g in goto.values() for name in g} | {arg[0] for a in actions.values() for s, arg in a.values() if not s})
        nt = {name: k for k, name in enumerate(names)}
        rules: dict[tuple[str, int], int] = {}
        action = np.zeros((n_states, n_terms), dtype=np.int32)
        for state, acts in actions.items():
            for t, (is_shift, arg) in acts.items():
                action[state, t] = arg + 1 if is_shift else -(rules.setdefault(arg, len(rules)) + 1)
        go = np.full((n_states, max(len(nt), 1)), -1, dtype=np.int32)
        for state, g in goto.items():
            for name, target in g.items():
                go[state, nt[name]] = target
        rule_nt = np.array([nt[name] for name, _ in rules], dtype=np.int32)
        rule_len = np.array([size for _, size in rules], dtype=np.int32)
        skip = np.zeros(n_terms, dtype=np.uint8)
        skip[list(ignored)] = 1
        handle = lib.loom_lalr_new(n_states, n_terms, go.shape[1], len(rules), action.ctypes.data, go.ctypes.data,
                                   rule_nt.ctypes.data, rule_len.ctypes.data, skip.ctypes.data, n_terms - 1, end_state,
                                   start_state)  # fmt: skip
        if not handle:
            raise MemoryError("the grammar's parser stacks could not be allocated")
        self.handle = handle
        self._lib = lib
        self._feed = lib.loom_lalr_feed
        self._top = lib.loom_lalr_top
        weakref.finalize(self, lib.loom_lalr_free, handle)

    def feed(self, sid: int, terminal: int) -> int:
        """The stack after a lexeme of `terminal` at stack `sid`; -1: not acceptable there. Raises
        BottomRead where the answer reads under a stack of top frames (`top_frames`)."""
        out = self._feed(self.handle, sid, terminal)
        if out == -4:
            raise BottomRead(sid)
        if out < -1:
            raise MemoryError("the grammar's parser stacks ran out of memory")
        return out

    def top_frames(self, sid: int, k: int) -> int:
        """Stack `sid`'s top `k` frames (k <= 256) on a bottom frame that reads as no state: a stack
        that answers every question as `sid` does wherever the answer reads no deeper, and
        raises BottomRead (from `feed`) where it would. `sid` itself when it has at most k frames."""
        out = self._lib.loom_lalr_top_frames(self.handle, sid, k)
        if out < 0:
            raise MemoryError("the grammar's parser stacks ran out of memory")
        return out

    def top(self, sid: int) -> int:
        return self._top(self.handle, sid)

    @property
    def count(self) -> int:
        return self._lib.loom_lalr_count(self.handle)

    @property
    def nbytes(self) -> int:
        return self._lib.loom_lalr_nbytes(self.handle)
