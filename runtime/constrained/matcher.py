"""The Grammar (grammar.py) both of Loom's own compilers share (regex_dfa.RegexGrammar, ebnf.EbnfGrammar).

A matcher is a stack of automaton states, one per accepted token after the initial one, over a
compiled grammar that is shared by all requests. Subclasses say how a token moves a state
(`_next`) and whether a state may end (`_can_end`); the compiled grammar provides
`mask(state) -> (packed mask, any non-EOS allowed)` and `forced_bytes(state)`.
"""

from __future__ import annotations

from typing import Any

import torch

from loom.runtime.constrained.bitmask import sparse_ids


class TokenMatcher:
    """A Grammar over a stack of states: rollback pops them, copy copies the stack (the compiled
    grammar's masks and forced bytes are shared)."""

    def __init__(self, compiled: Any, initial: Any, eos_token_ids: frozenset[int]) -> None:
        self.compiled = compiled
        self.eos_token_ids = eos_token_ids
        self.states: list[Any] = [initial]  # states[-1] is current; one per accepted token after
        self.finished = False  # EOS accepted

    @property
    def state(self) -> Any:
        return self.states[-1]

    def _next(self, state: Any, token_id: int) -> Any | None:
        """The state after a non-EOS token, or None when it is not allowed."""
        raise NotImplementedError

    def _can_end(self, state: Any) -> bool:
        raise NotImplementedError

    def accept_token(self, token_id: int) -> bool:
        if self.finished:
            return False
        if token_id in self.eos_token_ids:
            if not self._can_end(self.state):
                return False
            self.states.append(self.state)
            self.finished = True
            return True
        nxt = self._next(self.state, token_id)
        if nxt is None:
            return False
        self.states.append(nxt)
        return True

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        # bitmask_row: [ceil(V / 32)] int32
        bitmask_row.copy_(self.compiled.mask(self.state)[0])

    def allowed_ids(self, limit: int) -> torch.Tensor | None:
        return sparse_ids(self.compiled.mask(self.state)[0], limit)

    def allowed_non_eos(self) -> bool:
        """Whether any token but EOS is allowed here."""
        return self.compiled.mask(self.state)[1]

    def is_terminated(self) -> bool:
        return self.finished or (self._can_end(self.state) and not self.allowed_non_eos())

    def forced_bytes(self) -> bytes:
        return b"" if self.finished else self.compiled.forced_bytes(self.state)

    def rollback(self, k: int) -> None:
        if k < 0 or k > len(self.states) - 1:
            raise ValueError(f"cannot roll back {k} tokens: only {len(self.states) - 1} were accepted")
        if k:
            del self.states[-k:]
            self.finished = False

    def copy(self) -> TokenMatcher:
        other = type(self)(self.compiled)  # type: ignore[call-arg]
        other.states = list(self.states)
        other.finished = self.finished
        return other
