"""The wire between the engine processes: ZeroMQ `ipc://` sockets and a msgpack codec.

Every message is a dataclass from `loom.runtime.messages`, sent as a tagged envelope
`[type name, fields]` encoded with msgspec's msgpack (never pickle): a peer can only ever make
us build one of the registered message types.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from typing import Any

import msgspec
import zmq

from loom.runtime.messages import MESSAGE_TYPES

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def encode(msg: Any) -> bytes:
    name = type(msg).__name__
    assert MESSAGE_TYPES.get(name) is type(msg), f"{name} is not a registered message type"
    return _encoder.encode((name, msg))


def decode(data: bytes) -> Any:
    """bytes -> a message dataclass. Raises ValueError for anything that is not a known message."""
    try:
        name, fields = _decoder.decode(data)
        cls = MESSAGE_TYPES[name]
        return msgspec.convert(fields, type=cls)
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"malformed engine message: {exc}") from exc


@dataclasses.dataclass(frozen=True, slots=True)
class IpcPaths:
    """The three `ipc://` endpoints; each process binds the one it reads from."""

    root: str
    to_scheduler: str
    to_detokenizer: str
    to_front: str

    @classmethod
    def create(cls) -> "IpcPaths":
        root = tempfile.mkdtemp(prefix="loom-ipc-")  # mkdtemp makes it 0700
        os.chmod(root, 0o700)
        return cls(
            root,
            f"ipc://{root}/scheduler",
            f"ipc://{root}/detokenizer",
            f"ipc://{root}/front",
        )

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def parent_gone(parent_pid: int) -> bool:
    """True once the process that started us has exited (we were re-parented)."""
    return os.getppid() != parent_pid


# How long one send to a peer may block before the sender checks that its parent (the front)
# still lives. A PUSH socket blocks once the peer stops reading and the send queue (ZeroMQ's
# SNDHWM, 1,000 messages) is full: a dead front must not keep its children waiting forever.
SEND_TIMEOUT_MS = 1000


def engine_socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    """A socket between the engine processes: sends time out (SEND_TIMEOUT_MS, see `send_while_parent_lives`)
    and closing drops what is still queued (LINGER 0) rather than wait for a peer that may be gone."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    return sock


class ParentGone(BaseException):
    """The front that started this engine process has exited: the process should leave (`leave_orphaned`).

    A BaseException, as SystemExit is: no `except Exception` guarding a batch may take it for a
    failure of that batch and serve on."""


def send_while_parent_lives(sock: zmq.Socket, data: bytes, parent_pid: int) -> None:
    """Send, waiting as long as the peer is slow but the front lives; raises ParentGone once it is gone.

    Nothing is dropped while the front lives: a full queue means a slow reader, and the front
    fails the whole engine if one of its children dies."""
    while True:
        try:
            sock.send(data)
            return
        except zmq.Again:
            if parent_gone(parent_pid):
                raise ParentGone() from None


def leave_orphaned(paths: IpcPaths | None) -> None:
    """Exit now, the front being gone: remove the socket folder (the front cannot any more; the
    first child out does it, the others find it gone) and end the process without interpreter
    teardown, which would wait on threads (a grammar compile, the overlap worker) for nothing."""
    if paths is not None:
        paths.remove()
    logging.getLogger(__name__).warning("the front process is gone; exiting")
    logging.shutdown()
    os._exit(0)
