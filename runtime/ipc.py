"""The wire between the engine processes: ZeroMQ `ipc://` sockets and a msgpack codec.

Every message is a dataclass from `loom.runtime.messages`, sent as a tagged envelope
`[type name, fields]` encoded with msgspec's msgpack (never pickle): a peer can only ever make
us build one of the registered message types.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from typing import Any

import msgspec

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
