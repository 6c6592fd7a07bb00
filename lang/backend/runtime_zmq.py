"""`ZmqEndpoint`: the runtime's ZeroMQ front door (DEALER -> ROUTER, `loom.runtime.protocol`).

The same backend as `RuntimeEndpoint` over a different transport: the bodies and answers are
the /generate protocol's, carried as msgpack `FrontRequest`/`FrontReply` frames, with no HTTP on
the way. `loom.Runtime` starts the engine's processes and stands on this class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from loom.lang.backend.base import NativeBackend
from loom.runtime.protocol import FrontDoorClient


class ZmqTransport:
    def __init__(self, address: str, is_dead: Callable[[], str | None] | None = None) -> None:
        if not address.startswith(("ipc://", "tcp://", "inproc://")):
            raise ValueError(f"address must be a ZeroMQ endpoint (ipc://..., tcp://...), got {address!r}")
        self.address = address
        self._client = FrontDoorClient(address, is_dead)

    def generate(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        return self._client.call("generate", body)

    def generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield from self._client.stream("generate", {**body, "stream": True})

    def get_model_info(self) -> dict[str, Any]:
        return self._client.call("get_model_info")

    def flush_cache(self) -> None:
        self._client.call("flush_cache")

    def abort(self, rid: str) -> bool:
        return bool(self._client.call("abort_request", {"rid": rid}).get("success"))

    def close(self) -> None:
        self._client.close()


class ZmqEndpoint(NativeBackend):
    """A backend on a front door at `address`. `is_dead` (optional) names why the server is gone,
    so a call fails instead of waiting on a server process that died."""

    def __init__(self, address: str, is_dead: Callable[[], str | None] | None = None) -> None:
        super().__init__(ZmqTransport(address, is_dead))
        self.address = address

    def __repr__(self) -> str:
        return f"ZmqEndpoint({self.address!r})"
