"""Request bodies as bounded JSON: a size and a nesting depth that no client may exceed.

Shared by the HTTP routes (`http_io.read_json`) and the ZeroMQ front door, without FastAPI, so
the front door's process need not import it. Both limits are `loom serve` flags.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loom.runtime.protocol import RequestError

# 16 MiB: a whole 128K-token context is about 0.5 MB of text, or 0.9 MB as JSON token ids, so
# this leaves room for a batch of long prompts; reading it takes milliseconds. A larger body is a
# mistake or an attack (a 50 MB prompt kept every client waiting for half a minute).
DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20
# 64 levels: a /generate body is 3 deep, a chat body with a JSON Schema 4 plus the schema's own
# nesting; Python's json gives up (RecursionError) near 1,000.
DEFAULT_MAX_JSON_DEPTH = 64


def too_large(limit: int, got: int | None = None) -> RequestError:
    size = f" ({got} bytes)" if got is not None else ""
    return RequestError(f"the request body{size} is larger than this server's limit of {limit} bytes (--max-request-bytes)",
                        "body", 413)  # fmt: skip


def too_deep(limit: int) -> RequestError:
    return RequestError(f"the request body nests more than {limit} levels deep (--max-json-depth)", "body")


def nesting_depth_over(obj: Any, limit: int) -> bool:
    """Whether `obj` (decoded JSON or msgpack) nests dicts and lists more than `limit` deep; the
    top-level object is depth 1. Iterative: it never recurses, however deep `obj` is."""
    stack = [(obj, 1)] if isinstance(obj, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def check_depth(obj: Any, limit: int) -> None:
    """RequestError (400, naming `body`) when `obj` nests deeper than `limit`."""
    if nesting_depth_over(obj, limit):
        raise too_deep(limit)


# A \\uD800-\\uDFFF escape: JSON may spell half a surrogate pair, which is no Unicode text.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate_at(obj: Any) -> str | None:
    """Where in `obj` (decoded JSON) a string, key or value, holds an unpaired UTF-16 surrogate,
    as a field path (`messages[0].content`); None when every string is valid Unicode."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(node, dict):
            for key, child in node.items():
                child_path = f"{path}.{key}" if path else str(key)
                stack.append((key, child_path))
                stack.append((child, child_path))
        elif isinstance(node, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))
    return None


def _number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: an int when it has no fractional part (1.0,
    1e3), as JSON Schema's `integer` counts it and pydantic-based servers accept it for an int."""
    value = float(text)
    return int(value) if value.is_integer() else value


def loads_json(raw: bytes, max_depth: int) -> dict[str, Any]:
    """A request body as a JSON object. RequestError (400, naming `body`) for invalid JSON, a body
    that is not an object, or one nested deeper than `max_depth`."""
    try:
        body = json.loads(raw or b"null", parse_float=_number)
    except RecursionError:
        raise too_deep(max_depth) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", "body") from exc
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", "body")
    check_depth(body, max_depth)
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then walk the body (a pair is fine, half of one is not)
        where = lone_surrogate_at(body)
        if where is not None:
            raise RequestError(f"{where} holds an unpaired UTF-16 surrogate (a \\uD800-\\uDFFF escape alone), "
                               "which is not valid Unicode text", where)  # fmt: skip
    return body
