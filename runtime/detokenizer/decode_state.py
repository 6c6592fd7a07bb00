"""Incremental detokenization: token ids in, text deltas out.

Never emits half a UTF-8 character (a byte-level token can end mid-character), holds back text
that may be the start of a stop string, and trims the matched stop string (or stop token) from
the final text unless `no_stop_trim` is set. `Detokenizer` keeps one per running request.
"""

from __future__ import annotations

from typing import Any

from loom.runtime.messages import DecodeOptions

REPLACEMENT = "\ufffd"


class DecodeState:
    def __init__(self, tokenizer: Any, options: DecodeOptions | None = None) -> None:
        options = options or DecodeOptions()
        self.tokenizer = tokenizer
        self.decode_kwargs = {
            "skip_special_tokens": options.skip_special_tokens,
            "spaces_between_special_tokens": options.spaces_between_special_tokens,
        }
        self.stop = list(options.stop)
        self.no_stop_trim = options.no_stop_trim
        self.ids: list[int] = []
        self.text = ""  # complete characters decoded so far (untrimmed)
        self.surr_offset = 0
        self.read_offset = 0
        self.sent = 0  # characters of `visible` already handed out
        self.final: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, **self.decode_kwargs)

    def feed(self, new_ids: list[int]) -> None:
        if not new_ids:
            return
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.surr_offset : self.read_offset])
        full = self._decode(self.ids[self.surr_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix) :]
            # The tokens just read become the left context of the next decode.
            self.surr_offset = self.read_offset
            self.read_offset = len(self.ids)

    def finish(self, finished_reason: dict | None) -> None:
        """Fix the final text: everything decoded, minus the matched stop (unless no_stop_trim)."""
        matched = (finished_reason or {}).get("matched")
        ids = self.ids
        if isinstance(matched, int) and not self.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]
        text = self._decode(ids)
        if isinstance(matched, str) and not self.no_stop_trim:
            cut = text.find(matched)
            if cut >= 0:
                text = text[:cut]
        self.final = text

    def _visible(self) -> str:
        if self.final is not None:
            return self.final
        text = self.text
        if self.no_stop_trim or not self.stop:
            return text
        # Hold back a tail that could still grow into a stop string.
        hold = 0
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        return text[: len(text) - hold] if hold else text

    def take_delta(self) -> str:
        """Text that became final since the last call."""
        visible = self._visible()
        delta = visible[self.sent :]
        self.sent = max(self.sent, len(visible))
        return delta

    @property
    def output_text(self) -> str:
        return self._visible()
