"""How a native backend reaches the runtime: a transport carries SGLang's /generate protocol.

Two transports speak the same bodies and answers, so one backend serves both paths:
`HttpTransport` (a running `loom serve`, or any SGLang server) and `ZmqTransport`
(`runtime_zmq.py`: the front door of the runtime's own processes). Failed requests raise
`loom.runtime.protocol.RequestError` (4xx: the message names the field) or `ServerError` (5xx).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, Protocol

import httpx

from loom.runtime.protocol import RequestError, ServerError, raise_for_error


class Transport(Protocol):
    def generate(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        """One /generate call, not streamed: a result, or a list of results for a batch."""

    def generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The stream events of one /generate call for one prompt: `text` is the new text only
        (as Loom's front door streams it), with `meta_info`."""

    def get_model_info(self) -> dict[str, Any]: ...

    def flush_cache(self) -> None: ...

    def abort(self, rid: str) -> bool: ...

    def close(self) -> None: ...


class HttpTransport:
    """SGLang's native HTTP API (httpx; one connection pool shared by every program thread)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float | None = None) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout by default: a long generation is not an error.
        timeout = httpx.Timeout(timeout_s, connect=30.0)
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, limits=limits)

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = {"error": {"message": response.text or response.reason_phrase}}
        if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
            body = {"error": {"message": str(body)}}
        raise_for_error({"status": response.status_code, **body})

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerError(f"cannot reach the server at {self.base_url}{path}: {exc}") from exc
        self._check(response)
        return response

    def generate(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        return self._request("POST", "/generate", json=body).json()

    def generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        seen = ""
        try:
            with self._client.stream("POST", "/generate", json={**body, "stream": True}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:  # the server failed mid-stream
                        raise_for_error({"status": event["error"].get("code", 500), **event})
                    text = event["text"]  # cumulative, as SGLang's HTTP API streams it
                    event["text"], seen = text[len(seen) :], text
                    yield event
        except httpx.TransportError as exc:
            raise ServerError(f"the stream from {self.base_url}/generate broke: {exc}") from exc
        raise ServerError(f"the stream from {self.base_url}/generate ended without `data: [DONE]`")

    def get_model_info(self) -> dict[str, Any]:
        return self._request("GET", "/get_model_info").json()

    def flush_cache(self) -> None:
        self._request("POST", "/flush_cache")

    def abort(self, rid: str) -> bool:
        return bool(self._request("POST", "/abort_request", json={"rid": rid}).json().get("success"))

    def close(self) -> None:
        self._client.close()


__all__ = ["HttpTransport", "RequestError", "ServerError", "Transport"]
