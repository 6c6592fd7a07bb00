"""The detokenizer process: token ids from the scheduler in, text deltas to the front out
(`Detokenizer`, the same that `LocalEngine` runs in its own thread).

It leaves as soon as the front that started it is gone, busy or idle: it checks between any two
messages and whenever a send to the front blocks (`send_while_parent_lives`), removes the socket
folder and exits (`leave_orphaned`), so a dead front never keeps it waiting on a full queue.
"""

from __future__ import annotations

import logging
import signal
from typing import Any

import zmq

from loom.runtime.detokenizer.detokenizer import Detokenizer
from loom.runtime.ipc import IpcPaths, ParentGone, decode, encode, engine_socket, leave_orphaned, parent_gone, send_while_parent_lives
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # an idle detokenizer checks this often that the front still lives


def run_detokenizer_process(args_dict: dict[str, Any], paths: IpcPaths, parent_pid: int, log_level: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s detokenizer: %(message)s")
    from loom.runtime.tokenizer import load_tokenizer

    detok = Detokenizer(load_tokenizer(ServerArgs(**args_dict)))
    ctx = zmq.Context()
    pull = engine_socket(ctx, zmq.PULL)
    pull.bind(paths.to_detokenizer)
    push = engine_socket(ctx, zmq.PUSH)
    push.connect(paths.to_front)
    try:
        while True:
            if parent_gone(parent_pid):
                raise ParentGone()
            if not pull.poll(IDLE_POLL_MS):
                continue
            try:
                msg = decode(pull.recv())
            except ValueError:
                logger.exception("detokenizer dropped a malformed message")
                continue
            send_while_parent_lives(push, encode(detok.handle(msg)), parent_pid)
    except ParentGone:
        leave_orphaned(paths)
