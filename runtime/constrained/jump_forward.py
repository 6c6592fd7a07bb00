"""Jump-forward: append the string a grammar forces without one decode step per token.

    forced = grammar.forced_bytes()                      # e.g. b'address": ' inside a JSON object
    jump = plan_jump_forward(grammar, recent_ids, max_backoff, max_new, decode, tokenize)
    -> JumpForward(backoff=k, new_ids=[...]), the grammar already moved past them, or None

The forced bytes are not tokenized on their own: that would give a tokenization the model never
saw in training (`"` + `address` where the tokenizer writes `"address`). As llguidance does, the
last k output tokens are backed off and `text(those k) + forced` is tokenized as a whole, so the
result is the tokenizer's canonical tokenization across the seam. The last new token is left for
the model to sample (unless the grammar ends right after it): what follows the forced string may
merge with it into a longer token, which only the model's next step can choose.

Any Grammar (grammar.py) works: it uses `forced_bytes`, `accept_token`, `rollback`, `is_terminated`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loom.runtime.constrained.grammar import Grammar

# Tokens backed off before the forced string. One (the token just sampled) catches the common
# seam (`"` + `name` -> `"name`); more rarely changes the tokenization and recomputes KV.
MAX_BACKOFF = 1
# Fewest tokens a jump must save over decoding them one per step.
MIN_JUMP_TOKENS = 1

REPLACEMENT = "\ufffd"


@dataclass(frozen=True, slots=True)
class JumpForward:
    """Replace the last `backoff` output tokens by `new_ids` (the grammar has accepted them)."""

    backoff: int
    new_ids: list[int]

    @property
    def gain(self) -> int:
        return len(self.new_ids) - self.backoff


def whole_characters(data: bytes) -> str:
    """The longest prefix of `data` made of whole UTF-8 characters, decoded ("" when it starts
    inside a character: that byte is the model's to sample)."""
    for end in range(len(data), max(len(data) - 4, 0), -1):
        try:
            return data[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return ""


def plan_jump_forward(
    grammar: Grammar,
    recent_ids: list[int],
    max_backoff: int,
    max_new: int,
    decode: Callable[[list[int]], str],
    tokenize: Callable[[str], list[int]],
) -> JumpForward | None:
    """Move `grammar` past its forced string, canonically tokenized, and say how.

    recent_ids: the last tokens of the sequence, the newest last; the grammar has accepted the
    last `max_backoff` of them (which may be replaced) and at least one more token precedes those
    (the left context that decoding needs). max_new: the most tokens the sequence may grow by.
    Returns None, with the grammar unchanged, when nothing is forced, the retokenized text does
    not decode back to the same text (a tokenizer that adds a prefix space), the grammar refuses
    the new tokens, or the jump would save fewer than MIN_JUMP_TOKENS steps.
    """
    forced = whole_characters(grammar.forced_bytes())
    if not forced:
        return None
    assert len(recent_ids) > max_backoff, "recent_ids needs a context token before the back-off window"
    for k in range(max_backoff, -1, -1):
        context = recent_ids[len(recent_ids) - k - 1 :]  # one context token, then the k backed off
        old = context[1:]
        head = decode(context[:1])
        text = decode(context)
        if not text.startswith(head) or REPLACEMENT in text[len(head) :]:
            continue  # the back-off window does not start or end on a character boundary
        new_ids = tokenize(text[len(head) :] + forced)
        # Decoded after the same context token, so a tokenizer's prefix space or clean-up shows.
        if not new_ids or decode(context[:1] + new_ids) != text + forced:
            continue
        jump = _accept(grammar, old, new_ids[: k + max_new])
        if jump is not None:
            return jump
    return None


def _accept(grammar: Grammar, old: list[int], new_ids: list[int]) -> JumpForward | None:
    """Roll back `old`, accept `new_ids` (all of them if the grammar ends there, else all but the
    last); restore the grammar and return None if it refuses them or the jump saves too little."""
    k = len(old)
    grammar.rollback(k)
    accepted = 0
    for token in new_ids:
        if not grammar.accept_token(token):
            break
        accepted += 1
    keep = accepted
    if accepted == len(new_ids) and keep and not grammar.is_terminated():
        grammar.rollback(1)  # the model chooses the token at the seam, with what follows it
        keep -= 1
    if accepted == len(new_ids) and keep - k >= MIN_JUMP_TOKENS:
        return JumpForward(k, new_ids[:keep])
    grammar.rollback(keep)
    for token in old:
        ok = grammar.accept_token(token)
        assert ok, "a grammar must accept again the tokens it was rolled back from"
    return None
