"""Regex grammars on outlines-core: a compiled `Index` shared by all requests, a matcher each.

    CompiledRegex (Index + a cache of packed masks per automaton state)  ->  RegexGrammar per request

EOS ids are allowed exactly in the automaton's final states; accepting one terminates the grammar.
`forced_bytes()` (for jump-forward) is derived from the Index's token transitions and cached per state.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from outlines_core import Index, Vocabulary

from loom.runtime.constrained.bitmask import pack_allowed
from loom.runtime.constrained.errors import GrammarError


# Forced strings longer than this are cut (a bound for pathological automata; JSON keys are far shorter).
MAX_FORCED_BYTES = 4096


@dataclass(frozen=True, slots=True)
class ByteVocabulary:
    """outlines-core's Vocabulary plus the token bytes it was built from (which it does not give
    back, and which forced strings are spelled in)."""

    index_vocab: Vocabulary
    token_bytes: dict[int, bytes]


def build_vocabulary(token_bytes: dict[int, bytes], eos_token_ids: frozenset[int]) -> ByteVocabulary:
    """outlines-core's Vocabulary over byte keys (no hub access). Its own EOS id is only a
    marker here: the masks strip it and add the engine's EOS ids themselves."""
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, b in token_bytes.items():
        if token_id not in eos_token_ids:
            by_bytes.setdefault(b, []).append(token_id)
    marker = min(eos_token_ids) if eos_token_ids else max(token_bytes, default=0) + 1
    return ByteVocabulary(Vocabulary(marker, by_bytes), token_bytes)


class CompiledRegex:
    """An Index over the vocabulary plus per-state masks, computed once and shared (thread-safe)."""

    def __init__(self, regex: str, vocabulary: ByteVocabulary, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        try:
            self.index = Index(regex, vocabulary.index_vocab)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"regex {regex[:200]!r} cannot be compiled: {e}") from None
        self.regex = regex
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.vocabulary = vocabulary
        self._eos_marker = vocabulary.index_vocab.get_eos_token_id()
        self._masks: dict[int, tuple[torch.Tensor, bool]] = {}
        # state -> (bytes every continuation starts with, the state after them or None); see forced_bytes
        self._forced_step: dict[int, tuple[bytes, int | None]] = {}
        self._forced: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self.initial_state = self.index.get_initial_state()

    def mask(self, state: int) -> tuple[torch.Tensor, bool]:
        """-> (packed mask [ceil(V / 32)] int32, whether any non-EOS token is allowed)."""
        entry = self._masks.get(state)
        if entry is None:
            allowed = [t for t in self.index.get_allowed_tokens(state) or () if t != self._eos_marker]
            more = bool(allowed)
            if self.index.is_final_state(state):
                allowed += list(self.eos_token_ids)
            entry = (pack_allowed(allowed, self.vocab_size), more)
            with self._lock:
                self._masks[state] = entry
        return entry

    def next_state(self, state: int, token_id: int) -> int | None:
        if token_id == self._eos_marker:
            return None
        return self.index.get_next_state(state, token_id)

    def is_final(self, state: int) -> bool:
        return self.index.is_final_state(state)

    def forced_bytes(self, state: int) -> bytes:
        """The longest byte string every continuation from `state` starts with (b"" at a final
        state: EOS may end the text there). Follows `_step` from state to state; cached per state."""
        forced = self._forced.get(state)
        if forced is None:
            out, seen, s = bytearray(), set(), state
            while s is not None and s not in seen and len(out) < MAX_FORCED_BYTES:
                seen.add(s)
                chunk, s = self._step(s)
                out += chunk
            forced = bytes(out[:MAX_FORCED_BYTES])
            with self._lock:
                self._forced[state] = forced
        return forced

    def _step(self, state: int) -> tuple[bytes, int | None]:
        """(longest common prefix of the tokens allowed at `state`, the state after exactly those
        bytes or None). Every allowed token leads to a live state, so each one is a prefix of some
        accepted continuation and their common prefix is forced. To go on, the prefix must be a
        token itself (byte-level vocabularies have every single byte); otherwise the chain stops
        there, which under-approximates but never over-states what is forced."""
        step = self._forced_step.get(state)
        if step is not None:
            return step
        step = (b"", None)
        if not self.is_final(state):
            token_bytes = self.vocabulary.token_bytes
            prefix: bytes | None = None
            for t in self.index.get_allowed_tokens(state) or ():
                if t == self._eos_marker:
                    continue
                b = token_bytes[t]
                if prefix is None:
                    prefix = b
                elif not b.startswith(prefix):
                    n = 0
                    for x, y in zip(prefix, b):
                        if x != y:
                            break
                        n += 1
                    prefix = prefix[:n]
                    if not prefix:
                        break
            if prefix:
                ids = self.vocabulary.index_vocab.get(prefix) or ()
                nxt = self.index.get_next_state(state, ids[0]) if ids else None
                step = (prefix, nxt)
        with self._lock:
            self._forced_step[state] = step
        return step

    def matcher(self) -> RegexGrammar:
        return RegexGrammar(self)


class RegexGrammar:
    """One request's position in a compiled regex.

    accept_token(id) -> bool (False: the token is not allowed here; the state is unchanged);
    fill_mask(row) writes the allowed tokens into one packed bitmask row;
    is_terminated(): EOS was accepted, or the state is final and nothing but EOS may follow;
    forced_bytes(): the bytes every accepted continuation starts with (b"" when none or at a final state);
    rollback(k) undoes the last k accepted tokens; copy() is an independent matcher at the same state.
    """

    def __init__(self, compiled: CompiledRegex) -> None:
        self.compiled = compiled
        self.states: list[int] = [compiled.initial_state]  # states[-1] is current; one per accepted token after
        self.finished = False  # EOS accepted

    @property
    def state(self) -> int:
        return self.states[-1]

    def accept_token(self, token_id: int) -> bool:
        if self.finished:
            return False
        if token_id in self.compiled.eos_token_ids:
            if not self.compiled.is_final(self.state):
                return False
            self.states.append(self.state)
            self.finished = True
            return True
        nxt = self.compiled.next_state(self.state, token_id)
        if nxt is None:
            return False
        self.states.append(nxt)
        return True

    def fill_mask(self, bitmask_row: torch.Tensor) -> None:
        # bitmask_row: [ceil(V / 32)] int32
        bitmask_row.copy_(self.compiled.mask(self.state)[0])

    def allowed_non_eos(self) -> bool:
        return self.compiled.mask(self.state)[1]

    def is_terminated(self) -> bool:
        return self.finished or (self.compiled.is_final(self.state) and not self.allowed_non_eos())

    def forced_bytes(self) -> bytes:
        return b"" if self.finished else self.compiled.forced_bytes(self.state)

    def rollback(self, k: int) -> None:
        if k < 0 or k > len(self.states) - 1:
            raise ValueError(f"cannot roll back {k} tokens: only {len(self.states) - 1} were accepted")
        if k:
            del self.states[-k:]
            self.finished = False

    def copy(self) -> RegexGrammar:
        other = RegexGrammar(self.compiled)
        other.states = list(self.states)
        other.finished = self.finished
        return other
