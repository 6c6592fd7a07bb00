"""The detokenizer: the scheduler's token batches in, text deltas out, one `DecodeState` per
running request (incremental, UTF-8 safe, stop strings held back and trimmed).

A request's decode options arrive with its first output (`TokenIDOut.decode`); its state is
dropped with its last. Everything that is not a token batch (the ready handshake, flush and
info replies) passes through unchanged. It runs in its own process behind `loom serve`
(`process.py`) and in the caller's thread under `LocalEngine`.
"""

from __future__ import annotations

from typing import Any

from loom.runtime.detokenizer.decode_state import DecodeState
from loom.runtime.messages import BatchStrOut, BatchTokenIDOut, StrOut


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def handle(self, msg: Any) -> Any:
        """One message from the scheduler -> the message for the front."""
        if not isinstance(msg, BatchTokenIDOut):
            return msg
        outs = []
        for out in msg.outputs:
            state = self.states.get(out.rid)
            if state is None:
                state = self.states[out.rid] = DecodeState(self.tokenizer, out.decode)
            state.feed(out.new_token_ids)
            final = None
            if out.finished_reason is not None:
                state.finish(out.finished_reason)
                final = state.output_text
                del self.states[out.rid]
            outs.append(StrOut(out, state.take_delta(), final))
        return BatchStrOut(outs)
