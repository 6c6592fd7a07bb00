"""`loom serve`'s own flags for its HTTP front (they are not engine arguments): the API key, the
limits on what a client may send, who may call (Host and Origin checks), and the shutdown grace."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from loom.runtime.entrypoints.json_body import DEFAULT_MAX_JSON_DEPTH, DEFAULT_MAX_REQUEST_BYTES

API_KEY_ENV = "LOOM_API_KEY"
DEFAULT_SHUTDOWN_GRACE_S = 5.0
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class HttpOptions:
    """What `loom serve`'s HTTP front enforces. ValueError names a bad value."""

    api_key: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_json_depth: int = DEFAULT_MAX_JSON_DEPTH
    # Host header names accepted (ports aside); None: the loopback names when the server binds a
    # loopback address, any name otherwise. "*" accepts any. Loopback names are always accepted.
    allowed_hosts: tuple[str, ...] | None = None
    # Origins (scheme://host[:port]) whose browser pages may call the server (CORS); "*" any.
    # A request with another Origin header than the server's own is refused.
    allowed_origins: tuple[str, ...] = ()
    shutdown_grace_s: float = DEFAULT_SHUTDOWN_GRACE_S

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key is empty")
        if self.max_request_bytes < 1:
            raise ValueError(f"--max-request-bytes must be >= 1, got {self.max_request_bytes}")
        if self.max_json_depth < 2:
            raise ValueError(f"--max-json-depth must be >= 2 (a request body nests at least that deep), got {self.max_json_depth}")
        if not self.shutdown_grace_s >= 0:
            raise ValueError(f"--shutdown-grace-s must be >= 0, got {self.shutdown_grace_s}")
        for origin in self.allowed_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ValueError(f"--allowed-origins takes scheme://host[:port] origins or '*', got {origin!r}")

    def hosts_for(self, bind_host: str) -> frozenset[str] | None:
        """The Host names to accept when bound to `bind_host`; None: any."""
        if self.allowed_hosts is None:
            return frozenset(LOOPBACK_NAMES) if is_loopback(bind_host) else None
        if "*" in self.allowed_hosts:
            return None
        return frozenset(h.lower().strip("[]") for h in self.allowed_hosts) | frozenset(LOOPBACK_NAMES)


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine can reach."""
    host = host.lower().strip("[]").rstrip(".")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(flag: str | None, key_file: str | None) -> str | None:
    """The API key from `--api-key`, else `--api-key-file` (its first line), else $LOOM_API_KEY;
    None when none is given. ValueError when both flags are given or the file is unusable."""
    if flag is not None and key_file is not None:
        raise ValueError("give --api-key or --api-key-file, not both")
    if key_file is not None:
        try:
            with open(key_file, encoding="utf-8") as f:
                key = f.readline().strip()
        except OSError as exc:
            raise ValueError(f"--api-key-file {key_file}: {exc.strerror}") from None
        if not key:
            raise ValueError(f"--api-key-file {key_file} is empty")
        return key
    if flag is not None:
        return flag
    return os.environ.get(API_KEY_ENV) or None
