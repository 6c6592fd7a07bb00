"""Whitespace runs and digit runs crossed once: the split rows a terminal needs at a stack.

    restarts(dfa) -> bool                                   its accepting states read bytes as its start does
    staying_bytes(dfa) -> bytes                             those its accepting states read into accepting ones
    split_at_run_ends(splits, many, listable) -> (big rows, few-token rows, their listing | None)

A lexer-state scan (ebnf_scan) gives, per offset j, the tokens that may end the lexeme after j
bytes; each is crossed into the next lexeme (ebnf_masks). For an ignored terminal such as
`WS: /[ \t\n]+/` (every accepting state reads each byte as the start state does), ending the
lexeme inside a run and starting a new one there is the run going on, so where no other terminal
starts with its bytes (EbnfMasks._run_ends checks that, per stack) a token that may also end it one
byte later needs no split at j: an indentation token is crossed where its run ends, not at each of
its bytes. Likewise for any terminal where no terminal startable after it starts with a byte its
accepting states stay accepting on (a number's digits, where an operator must follow): a split
inside the run is dead. The rows are kept per scan (scans are shared by every grammar on a
vocabulary), and taken in C where a compiler is at hand (a number's 54 rows at a 128k vocabulary:
~0.35 ms against ~0.9 in numpy, once per scan, in the first mask that needs them).
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from loom.runtime.constrained.bitmask import unpack_ids
from loom.runtime.constrained.native_c import compile_c

_KEPT: dict[int, tuple] = {}  # id(a scan's splits) -> (them, split_at_run_ends' answer)
_LOCK = threading.Lock()
_MAX_KEPT = 256  # entries (an ignored run's scans: its states at a few offsets, per vocabulary)

_C_SOURCE = r"""
#include <stdint.h>

static int64_t popcount64(uint64_t v) {  /* (no -mpopcnt: the builtin would call a table routine) */
    v = v - ((v >> 1) & 0x5555555555555555ULL);
    v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
    v = (v + (v >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int64_t)((v * 0x0101010101010101ULL) >> 56);
}

/* Rows [k, width] of packed tokens (width even) at offsets offs (ascending): counts[i] = the tokens
   of row i less those of the next row where that is at the next offset. */
void loom_run_counts(const uint64_t *rows, const int64_t *offs, int64_t k, int64_t width, int64_t *counts) {
    int64_t half = width / 2;
    for (int64_t i = 0; i < k; i++) {
        const uint64_t *a = rows + i * half, *b = a + half;
        int64_t n = 0;
        if (i + 1 < k && offs[i + 1] == offs[i] + 1)
            for (int64_t w = 0; w < half; w++) n += popcount64(a[w] & ~b[w]);
        else
            for (int64_t w = 0; w < half; w++) n += popcount64(a[w]);
        counts[i] = n;
    }
}

/* Rows sel[0..n) as loom_run_counts counts them, into out [n, width] (zeroed: only the non-zero words
   are written), and where ids is given, their token ids row by row (each ascending) with each one's
   offset into at. -> how many ids. */
int64_t loom_run_rows(const uint32_t *rows, const int64_t *offs, int64_t k, int64_t width, const int64_t *sel, int64_t n,
                      uint32_t *out, int64_t *ids, int64_t *at) {
    int64_t m = 0;
    for (int64_t r = 0; r < n; r++) {
        int64_t i = sel[r];
        const uint32_t *a = rows + i * width, *b = (i + 1 < k && offs[i + 1] == offs[i] + 1) ? a + width : 0;
        uint32_t *o = out + r * width;
        for (int64_t w = 0; w < width; w++) {
            uint32_t v = b ? a[w] & ~b[w] : a[w];
            if (!v) continue;
            o[w] = v;
            if (ids)
                for (; v; v &= v - 1) {
                    ids[m] = w * 32 + __builtin_ctz(v);
                    at[m++] = offs[i];
                }
        }
    }
    return m;
}
"""


@functools.cache
def _library() -> ctypes.CDLL | None:
    lib = compile_c(_C_SOURCE, "loom_ebnf_runs", "the run ends of split rows")
    if lib is not None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.loom_run_counts.argtypes, lib.loom_run_counts.restype = [ptr, ptr, i64, i64, ptr], None
        lib.loom_run_rows.argtypes, lib.loom_run_rows.restype = [ptr, ptr, i64, i64, ptr, i64, ptr, ptr, ptr], i64
    return lib


def restarts(dfa) -> bool:
    """Whether every accepting state of the automaton reads each byte as its start state does (kept
    with it): a lexeme may end and a new one start anywhere inside a run, to the same effect."""
    held = dfa.derived.get("restarts")
    if held is None:
        accepting = np.flatnonzero(dfa.accepting[: dfa.dead])
        held = dfa.derived["restarts"] = len(accepting) > 0 and bool((dfa.table[accepting] == dfa.table[0]).all())
    return held


def staying_bytes(dfa) -> frozenset[int]:
    """The bytes some accepting state of the automaton reads into an accepting state (kept with it):
    a token that may end a lexeme after j bytes and after j + 1 has one of these at byte j."""
    held = dfa.derived.get("staying")
    if held is None:
        accepting = np.flatnonzero(dfa.accepting[: dfa.dead])
        nxt = dfa.table[accepting]  # [accepting states, 256]
        held = dfa.derived["staying"] = frozenset(np.flatnonzero(dfa.accepting[nxt].any(axis=0)).tolist())
    return held


def _c_run_ends(lib: ctypes.CDLL, rows: np.ndarray, js: np.ndarray, many: int, listable: bool) -> tuple:
    """split_at_run_ends' answer in C: the rows counted in one pass, then only the rows kept written."""
    counts = np.empty(len(js), dtype=np.int64)
    lib.loom_run_counts(rows.ctypes.data, js.ctypes.data, len(js), rows.shape[1], counts.ctypes.data)
    sel = [np.flatnonzero(counts > many), np.flatnonzero((counts > 0) & (counts <= many))]  # big rows, few rows
    listed = None
    parts: list[dict[int, np.ndarray]] = []
    for k, rows_of in enumerate(sel):
        words = np.zeros((len(rows_of), rows.shape[1]), dtype=np.uint32)  # (calloc: pages no token is on stay untouched)
        n = int(counts[rows_of].sum()) if k and len(rows_of) >= 2 and listable else 0
        ids, offs = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        lib.loom_run_rows(rows.ctypes.data, js.ctypes.data, len(js), rows.shape[1], rows_of.ctypes.data, len(rows_of), words.ctypes.data,
                          ids.ctypes.data if n else None, offs.ctypes.data if n else None)  # fmt: skip
        parts.append({int(js[i]): words[r] for r, i in enumerate(rows_of.tolist())})
        if n:
            listed = (ids, offs, (ids.ctypes.data, offs.ctypes.data, n))  # (as counted_scan.listed_rows lists them)
    return parts[0], parts[1], listed


def _numpy_run_ends(rows: np.ndarray, js: np.ndarray, many: int, listable: bool) -> tuple:
    """split_at_run_ends' answer without C."""
    words = rows.copy()
    nxt = np.flatnonzero(js[1:] == js[:-1] + 1)  # rows whose next offset has a row
    words[nxt] &= ~rows[nxt + 1]
    counts = np.bitwise_count(words).sum(axis=1)
    big = {int(j): words[i] for i, j in enumerate(js) if counts[i] > many}
    small = np.flatnonzero((counts > 0) & (counts <= many))
    few = {int(js[i]): words[i] for i in small.tolist()}
    listed = None
    if len(few) >= 2 and listable:
        flat = unpack_ids(words[small].reshape(-1))  # ids numbered row by row
        ids = np.ascontiguousarray(flat % (32 * words.shape[1]), dtype=np.int64)
        offs = np.ascontiguousarray(js[small][flat // (32 * words.shape[1])])
        listed = (ids, offs, (ids.ctypes.data, offs.ctypes.data, len(ids)))
    return big, few, listed


def split_at_run_ends(
    splits: dict[int, np.ndarray], many: int, listable: bool
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], tuple | None]:
    """The split rows (offset -> packed tokens) less each token that is in the next row too: rows of
    more than `many` tokens as rows (big), the few-token ones (a run's end in an indentation token,
    at each offset) listed to cross in one walk where `listable` (ebnf_masks._cross_list), not one C
    call and two memo rows each. -> (big, few, few's listing)."""
    with _LOCK:
        held = _KEPT.get(id(splits))
    if held is not None and held[0] is splits:
        return held[1]
    order = sorted(splits)
    js = np.array(order, dtype=np.int64)
    rows = np.stack([splits[j] for j in order])  # [rows, width]
    lib = _library() if rows.shape[1] % 2 == 0 else None  # (C reads the words in pairs)
    answer = _c_run_ends(lib, rows, js, many, listable) if lib is not None else _numpy_run_ends(rows, js, many, listable)
    with _LOCK:
        if len(_KEPT) >= _MAX_KEPT:
            _KEPT.clear()
        _KEPT[id(splits)] = (splits, answer)
    return answer
