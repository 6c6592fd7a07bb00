"""Stacks that differ only deep down share their masks: a mask is computed at its stacks' top frames.

    tops = TopFrames(compiled.stacks, compiled.n_lex)   once per compiled grammar (C stacks only)
    words = tops.taken(configs, take)                    take(configs on their stacks' top frames),
                                                         on more frames where those were too few

A token's mask reads a stack only as deep as its lexemes' reductions pop: an arithmetic expression
nested in a tenth parenthesis reads what the ninth did (a token closes a few at most), and a JSON
value at depth ten what it read at depth nine. But every new depth is a new stack, and every memo
of the masks (parser rows, crossing verdicts, scans' unions) is per stack: each mask at a new depth
cost its whole work again (`bench_ebnf_mask.py --nest 30 --vocab-size 131072`, past ten levels:
0.18 ms an arithmetic mask, 0.15 a JSON one; 0.011 and 0.008 at a stand-in). So a configuration's stack stands in for
itself by its top k frames over a bottom frame that reads as no state (lalr_native.top_frames,
interned as any stack): stacks with the same top frames share one stand-in, and its memos.

Sound by construction: every answer about a stand-in is computed from the frames it holds, and an
answer that would read the bottom frame raises BottomRead (lalr_native), before anything is kept.
The mask is then taken again on more frames (FRAMES, then the whole stack), and a stand-in found
too short is not used again. A stand-in's verdicts are those of every stack with its top frames,
for the same reason. What the caller keeps per stand-in must be filled after the fact (never
before: a BottomRead half-way would leave it wrong), as the masks' memos are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from loom.runtime.constrained.lalr_native import BottomRead

if TYPE_CHECKING:
    from loom.runtime.constrained.lalr_native import NativeStacks

T = TypeVar("T")

FRAMES = (8, 24, 64)  # the top frames tried, fewest first; then the whole stack
_HELD_LIMIT = 100_000  # stacks whose stand-in is kept before the map is cleared (found again on demand)


class TopFrames:
    """A compiled grammar's stand-in stacks (see the module's docstring)."""

    def __init__(self, stacks: NativeStacks, n_lex: int) -> None:
        self.stacks = stacks
        self.n_lex = n_lex
        self.frames = FRAMES
        self.too_short: set[int] = set()  # stand-ins whose answers read under their frames
        self._of: dict[int, int] = {}  # stack -> its stand-in (itself: none shorter will do)

    def taken(self, configs: frozenset[int], take: Callable[[frozenset[int]], T]) -> T:
        """take(configs on their stacks' stand-ins), taken again on more frames (then the whole
        stacks) each time it reads under them."""
        while True:
            short, used = self.stand_in(configs)
            try:
                return take(short)
            except BottomRead:
                if not used:
                    raise
                self.too_short.update(used)

    def stand_in(self, configs: frozenset[int]) -> tuple[frozenset[int], list[int]]:
        """-> (configs on their stacks' stand-ins, the stand-ins used that are not whole stacks)."""
        out: list[int] = []
        used: list[int] = []
        for c in configs:
            sid, lex = divmod(c, self.n_lex)
            short = self._short(sid)
            if short != sid:
                used.append(short)
            out.append(short * self.n_lex + lex)
        return frozenset(out), used

    def _short(self, sid: int) -> int:
        held = self._of.get(sid)
        if held is not None and held not in self.too_short:
            return held
        out = sid
        for k in self.frames:
            short = self.stacks.top_frames(sid, k)
            if short == sid:  # (no more frames than k)
                break
            if short not in self.too_short:
                out = short
                break
        if len(self._of) > _HELD_LIMIT:
            self._of.clear()
        self._of[sid] = out
        return out
