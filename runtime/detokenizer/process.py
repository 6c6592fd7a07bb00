"""The detokenizer process: token ids from the scheduler in, text deltas to the front out.

One `DecodeState` per request (incremental, UTF-8 safe, stop strings held back and trimmed).
Everything that is not a token batch (the ready handshake, flush and info replies) is passed on
to the front unchanged.
"""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import zmq

from loom.runtime.detokenizer.decode_state import DecodeState
from loom.runtime.ipc import IpcPaths, decode, encode, parent_gone
from loom.runtime.messages import BatchStrOut, BatchTokenIDOut, DetokenizeInit, StrOut
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000


class Detokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: dict[str, DecodeState] = {}

    def handle(self, msg: Any) -> Any | None:
        """One message in -> the message for the front (None: nothing to send)."""
        if isinstance(msg, DetokenizeInit):
            self.states[msg.rid] = DecodeState(
                self.tokenizer,
                skip_special_tokens=msg.skip_special_tokens,
                spaces_between_special_tokens=msg.spaces_between_special_tokens,
                stop=msg.stop,
                no_stop_trim=msg.no_stop_trim,
            )
            return None
        if isinstance(msg, BatchTokenIDOut):
            outs = []
            for out in msg.outputs:
                state = self.states.get(out.rid)
                if state is None:  # a request rejected by the scheduler before any init
                    state = self.states[out.rid] = DecodeState(self.tokenizer)
                state.feed(out.new_token_ids)
                final = None
                if out.finished_reason is not None:
                    state.finish(out.finished_reason)
                    final = state.output_text
                    del self.states[out.rid]
                outs.append(StrOut(out, state.take_delta(), final))
            return BatchStrOut(outs)
        return msg


def run_detokenizer_process(args_dict: dict[str, Any], paths: IpcPaths, parent_pid: int, log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s detokenizer: %(message)s")
    from loom.runtime.tokenizer import load_tokenizer

    detok = Detokenizer(load_tokenizer(ServerArgs(**args_dict)))
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(paths.to_detokenizer)
    push = ctx.socket(zmq.PUSH)
    push.connect(paths.to_front)
    while True:
        if not pull.poll(IDLE_POLL_MS):
            if parent_gone(parent_pid):
                sys.exit(0)
            continue
        try:
            msg = decode(pull.recv())
        except ValueError:
            logger.exception("detokenizer dropped a malformed message")
            continue
        reply = detok.handle(msg)
        if reply is not None:
            push.send(encode(reply))
