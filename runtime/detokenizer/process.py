"""The detokenizer process: token ids from the scheduler in, text deltas to the front out
(`Detokenizer`, the same that `LocalEngine` runs in its own thread)."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any

import zmq

from loom.runtime.detokenizer.detokenizer import Detokenizer
from loom.runtime.ipc import IpcPaths, decode, encode, parent_gone
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000


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
        push.send(encode(detok.handle(msg)))
