"""The scheduler's I/O: `recv() -> messages`, `send(message)`. The same scheduler runs in the
caller's thread (`LocalIO`, under `LocalEngine`) and in its own process behind ZeroMQ (`ZmqIO`);
tensor-parallel ranks wrap these (`tp_scheduler.py`)."""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Protocol

import zmq

from loom.runtime.ipc import IpcPaths, decode, encode, engine_socket, send_while_parent_lives

logger = logging.getLogger(__name__)


class SchedulerIO(Protocol):
    def recv(self) -> list[Any]: ...

    def send(self, msg: Any) -> None: ...


class LocalIO:
    """The scheduler's I/O when it runs in the caller's thread."""

    def __init__(self) -> None:
        self.inbox: deque[Any] = deque()
        self.outbox: deque[Any] = deque()

    def recv(self) -> list[Any]:
        msgs = list(self.inbox)
        self.inbox.clear()
        return msgs

    def send(self, msg: Any) -> None:
        self.outbox.append(msg)


class ZmqIO:
    """The scheduler's I/O in its own process: PULL from the front, PUSH to the detokenizer.

    `send` raises ParentGone when it cannot deliver and the front (`parent_pid`) has exited."""

    def __init__(self, ctx: zmq.Context, paths: IpcPaths, parent_pid: int) -> None:
        self.parent_pid = parent_pid
        self.pull = engine_socket(ctx, zmq.PULL)
        self.pull.bind(paths.to_scheduler)
        self.push = engine_socket(ctx, zmq.PUSH)
        self.push.connect(paths.to_detokenizer)

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
            msgs.append(msg)

    def send(self, msg: Any) -> None:
        send_while_parent_lives(self.push, encode(msg), self.parent_pid)

    def wait(self, timeout_ms: int) -> None:
        self.pull.poll(timeout_ms)
