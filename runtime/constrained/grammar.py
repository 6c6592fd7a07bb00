"""The per-request grammar matcher every backend provides, as the scheduler and jump-forward use it.

    compiled.matcher() -> Grammar: RegexGrammar, EbnfGrammar (matcher.TokenMatcher),
                                   XGrammarGrammar, LLGuidanceGrammar
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Grammar(Protocol):
    """One request's position in a compiled grammar. Called from the scheduler's thread only; the
    compiled grammar behind it is shared by every request using the same source.

    A position moves by accepted tokens, EOS included (accepted only where the grammar may end;
    nothing is accepted after it). Each decode step the scheduler asks `allowed_ids` (to compute
    only those logits) or `fill_mask` (to mask them all), samples, calls `accept_token` with the
    sampled token, then `is_terminated` to tell whether the request is done. Jump-forward
    (jump_forward.py) reads `forced_bytes`, then moves the position with `rollback` and
    `accept_token`; `copy` forks a position.
    """

    def accept_token(self, token_id: int) -> bool:
        """Move past one token. False: the token is not allowed here, and the position is unchanged."""
        ...

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        """Write the tokens allowed next into `bitmask_row`, one row of the batch's packed bitmask:
        int32 [ceil(V / 32)], on the CPU, contiguous; bit i % 32 of word i // 32 set = token i
        allowed (EOS among them where the grammar may end). Every bit is written."""
        ...

    def allowed_ids(self, limit: int) -> torch.Tensor | None:
        """The token ids `fill_mask` would allow (int64 [n], ascending, n <= limit), when there are at
        most `limit` of them and the backend can tell cheaply; else None (the scheduler then
        computes every logit and masks them with `fill_mask`)."""
        ...

    def is_terminated(self) -> bool:
        """EOS was accepted, or the grammar may end here and allows nothing but EOS: the request is done."""
        ...

    def forced_bytes(self) -> bytes:
        """The bytes every accepted continuation starts with; b"" when none, or where the grammar
        may end here."""
        ...

    def rollback(self, k: int) -> None:
        """Undo the last `k` accepted tokens (EOS included). Raises ValueError when fewer were accepted."""
        ...

    def copy(self) -> Grammar:
        """An independent matcher at the same position (the compiled grammar stays shared)."""
        ...
