"""`RuntimeEndpoint`: a running `loom serve` (or any server speaking SGLang's /generate) over HTTP."""

from __future__ import annotations

from loom.lang.backend.base import NativeBackend
from loom.lang.backend.transport import HttpTransport


class RuntimeEndpoint(NativeBackend):
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float | None = None) -> None:
        super().__init__(HttpTransport(base_url, api_key, timeout_s))
        self.base_url = self.transport.base_url
        self.model_info  # fail now, not in the first program, when the server is not there

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"
