"""Whitespace runs crossed once: the split rows an ignored, self-restarting terminal needs.

    restarts(dfa) -> bool                                   its accepting states read bytes as its start does
    split_at_run_ends(splits, many, unpack, listable) -> (big rows, few-token rows, their listing | None)

A lexer-state scan (ebnf_scan) gives, per offset j, the tokens that may end the lexeme after j
bytes; each is crossed into the next lexeme (ebnf_masks). For an ignored terminal such as
`WS: /[ \t\n]+/` (every accepting state reads each byte as the start state does), ending the
lexeme inside a run and starting a new one there is the run going on, so where no other terminal
starts with its bytes (EbnfMasks._run_ends checks that, per stack) a token that may also end it one
byte later needs no split at j: an indentation token is crossed where its run ends, not at each of
its bytes. The rows are kept per scan (scans are shared by every grammar on a vocabulary).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from loom.runtime.constrained.counted_scan import listed_rows

_KEPT: dict[int, tuple] = {}  # id(a scan's splits) -> (them, split_at_run_ends' answer)
_LOCK = threading.Lock()
_MAX_KEPT = 256  # entries (an ignored run's scans: its states at a few offsets, per vocabulary)


def restarts(dfa) -> bool:
    """Whether every accepting state of the automaton reads each byte as its start state does (kept
    with it): a lexeme may end and a new one start anywhere inside a run, to the same effect."""
    held = dfa.lexer_rows.get("restarts")
    if held is None:
        accepting = np.flatnonzero(dfa.accepting[: dfa.dead])
        held = dfa.lexer_rows["restarts"] = (len(accepting) > 0 and bool((dfa.table[accepting] == dfa.table[0]).all()),)
    return held[0]


def split_at_run_ends(
    splits: dict[int, np.ndarray], many: int, unpack: Callable[[np.ndarray], np.ndarray], listable: bool
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], tuple | None]:
    """The split rows (offset -> packed tokens) less each token that is in the next row too: rows of
    more than `many` tokens as rows (big), the few-token ones (a run's end in an indentation token,
    at each offset) listed to cross in one walk where `listable` (ebnf_masks._cross_list), not one C
    call and two memo rows each. `unpack`: packed words -> token ids. -> (big, few, few's listing)."""
    with _LOCK:
        held = _KEPT.get(id(splits))
    if held is not None and held[0] is splits:
        return held[1]
    big: dict[int, np.ndarray] = {}
    few: dict[int, np.ndarray] = {}
    for j, enders in splits.items():
        later = splits.get(j + 1)
        row = enders & ~later if later is not None else enders
        if int(np.bitwise_count(row).sum()) > many:
            big[j] = row
        elif row.any():
            few[j] = row
    listed = listed_rows({j: unpack(row) for j, row in few.items()}) if len(few) >= 2 and listable else None
    answer = (big, few, listed)
    with _LOCK:
        if len(_KEPT) >= _MAX_KEPT:
            _KEPT.clear()
        _KEPT[id(splits)] = (splits, answer)
    return answer
