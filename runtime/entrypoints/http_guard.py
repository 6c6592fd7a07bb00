"""What every HTTP request passes before it reaches a route, as one plain ASGI middleware (not
BaseHTTPMiddleware, so routes still see client disconnects):

- while the server shuts down, 503 to every new request;
- the Host header must name this server (by default only loopback names when it binds a
  loopback address: no DNS rebinding); a browser's Origin header must be the server's own or one
  that `--allowed-origins` lets in (CORS itself is Starlette's CORSMiddleware, outside this one);
- the API key (`Authorization: Bearer KEY`, the scheme in any case) on every route but /health;
- a Content-Length over `--max-request-bytes` is refused before the body is read (a body sent
  without one is counted while it is read, in `http_io.read_json`);
- HEAD is answered wherever GET is, without the body.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from loom.runtime.entrypoints.http_io import error_response
from loom.runtime.entrypoints.http_options import HttpOptions
from loom.runtime.entrypoints.json_body import too_large

# The routes that run a generation: a refusal here counts in loom_requests_total{finish_reason="refused"}.
GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


@dataclass
class Admission:
    """Whether the server takes new requests, and how many it is answering now."""

    closing: str | None = None  # the reason new requests are refused (503), once shutting down
    in_flight: int = 0


class HttpGuard:
    def __init__(self, app: Any, options: HttpOptions, bind_host: str, admission: Admission, on_refused: Any) -> None:
        self.app = app
        self.options = options
        self.hosts = options.hosts_for(bind_host)
        self.origins = frozenset(o.rstrip("/").lower() for o in options.allowed_origins)
        self.expected_key = options.api_key.encode() if options.api_key is not None else None
        self.admission = admission
        self.on_refused = on_refused  # called with the path of a generation request refused here

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            status, message, param, err_type = refusal
            if scope["path"] in GENERATION_PATHS:
                self.on_refused(scope["path"])
            await error_response(status, message, param, err_type)(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
            send = _without_body(send)
        self.admission.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.in_flight -= 1

    def _refusal(self, scope: dict, headers: dict[bytes, bytes]) -> tuple[int, str, str | None, str | None] | None:
        """(status, message, param, type) of why this request is refused, or None to let it in."""
        host = headers.get(b"host", b"").decode("latin-1")
        if self.hosts is not None and host and _host_name(host) not in self.hosts:
            return (403, f"the Host header {host!r} does not name this server; it answers {sorted(self.hosts)} "
                         "(--allowed-hosts, or --host to open it to other addresses)", "host", "forbidden")  # fmt: skip
        origin = headers.get(b"origin")
        if origin is not None and not self._origin_allowed(origin.decode("latin-1"), host):
            return (403, f"cross-origin requests from {origin.decode('latin-1')!r} are not allowed (--allowed-origins)",
                    "origin", "forbidden")  # fmt: skip
        if self.admission.closing is not None:
            return 503, self.admission.closing, None, "service_unavailable"
        if self.expected_key is not None and scope["path"] != "/health" and not self._key_ok(headers.get(b"authorization")):
            return 401, "missing or wrong API key: send `Authorization: Bearer <key>`", "authorization", "authentication_error"
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.options.max_request_bytes:
            exc = too_large(self.options.max_request_bytes, int(length))
            return exc.status, str(exc), exc.param, None
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.rstrip("/").lower()
        if "*" in self.origins or origin in self.origins:
            return True
        # The server's own pages (FastAPI's /docs) send their own origin.
        return bool(host) and origin in (f"http://{host.lower()}", f"https://{host.lower()}")

    def _key_ok(self, header: bytes | None) -> bool:
        assert self.expected_key is not None
        scheme, _, token = (header or b"").strip().partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), self.expected_key)


def _host_name(host: str) -> str:
    """A Host header without its port: "[::1]:8000" -> "::1", "Localhost:80" -> "localhost"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, port = host.rpartition(":")
    return (name if name and port.isdigit() else host).rstrip(".")


def _without_body(send: Any) -> Any:
    """A `send` for HEAD: the GET answer's status and headers, no body."""

    async def send_head(message: dict) -> None:
        if message["type"] == "http.response.body":
            if message.get("more_body", False):
                return
            message = {"type": "http.response.body", "body": b"", "more_body": False}
        await send(message)

    return send_head
