"""The scheduler process: ModelRunner + Scheduler behind ZeroMQ.

PULL from the front (requests, aborts, flushes) and PUSH to the detokenizer (token ids, replies).
The loop steps the scheduler while it has work and otherwise blocks on a poll of its socket, so
an idle server burns no CPU.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

import zmq

from loom.runtime.ipc import IpcPaths, decode, encode, parent_gone
from loom.runtime.messages import (
    DetokenizeInit,
    SchedulerInfoOut,
    SchedulerInfoReq,
    SchedulerReady,
    TokenizedGenerateReq,
)
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # also how often an idle scheduler checks that its parent still lives
PENDING_POLL_MS = 2  # requests wait but none could run (grammars compiling, memory short)


class ZmqIO:
    """The scheduler's I/O in its own process. It also answers the front's info queries and tells
    the detokenizer how to decode each request before the scheduler sees it."""

    def __init__(self, ctx: zmq.Context, paths: IpcPaths) -> None:
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(paths.to_scheduler)
        self.push = ctx.socket(zmq.PUSH)
        self.push.connect(paths.to_detokenizer)
        self.scheduler: Any = None

    def recv(self) -> list[Any]:
        msgs: list[Any] = []
        while True:
            try:
                data = self.pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return msgs
            try:
                msg = decode(data)
            except ValueError:
                logger.exception("scheduler dropped a malformed message")
                continue
            if isinstance(msg, TokenizedGenerateReq):
                p = msg.sampling_params
                self.send(
                    DetokenizeInit(
                        msg.rid,
                        skip_special_tokens=p.get("skip_special_tokens", True),
                        spaces_between_special_tokens=p.get("spaces_between_special_tokens", True),
                        stop=list(p.get("stop") or []),
                        no_stop_trim=p.get("no_stop_trim", False),
                    )
                )
            elif isinstance(msg, SchedulerInfoReq):
                s = self.scheduler
                self.send(SchedulerInfoOut(s.memory_report(), dict(s.stats), len(s.running), len(s.waiting)))
                continue
            msgs.append(msg)

    def send(self, msg: Any) -> None:
        self.push.send(encode(msg))

    def wait(self, timeout_ms: int) -> None:
        self.pull.poll(timeout_ms)


def run_scheduler_process(args_dict: dict[str, Any], paths: IpcPaths, parent_pid: int, log_level: str) -> None:
    """Process entry point. Exits when the parent goes away; any crash ends the process non-zero."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when we stop
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s scheduler: %(message)s")
    from transformers import AutoTokenizer

    from loom.runtime.engine import eos_token_ids
    from loom.runtime.model_runner import ModelRunner
    from loom.runtime.scheduler import Scheduler

    args = ServerArgs(**args_dict)
    ctx = zmq.Context()
    io = ZmqIO(ctx, paths)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)
    runner = ModelRunner(args)
    scheduler = Scheduler(
        args,
        runner,
        io,
        decode_tail=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        eos_token_ids=eos_token_ids(args.model_path, runner.hf_config, tokenizer),
        tokenize=lambda text: tokenizer.encode(text, add_special_tokens=False),
    )
    io.scheduler = scheduler
    io.send(SchedulerReady(runner.context_len, runner.vocab_size, runner.max_total_tokens))
    logger.info("ready (pid %d)", os.getpid())
    while True:
        if scheduler.step():
            continue
        # Nothing ran: block on the socket; briefly while requests wait (e.g. grammars compiling).
        io.wait(PENDING_POLL_MS if scheduler.has_work() else IDLE_POLL_MS)
        if parent_gone(parent_pid):
            logger.warning("the front process is gone; exiting")
            sys.exit(0)
