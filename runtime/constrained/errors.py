"""The one error a grammar backend raises for user input it cannot compile, and what kind it is."""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """What a GrammarError says about the source as a whole, for a caller choosing what to try next
    (GrammarBackend tries the grammar path for a JSON Schema the regex path refuses, unless the
    schema is MALFORMED, EMPTY or TOO_LARGE; ebnf's terminals read an EMPTY regex as the empty automaton)."""

    INVALID = "invalid"  # the default: the source, or a part of it, is invalid or past what this compiler enforces
    MALFORMED = "malformed"  # the source as a whole does not parse (a JSON Schema that is not JSON)
    EMPTY = "empty"  # the source admits no string at all (the schema `false`, a regex matching nothing)
    TOO_LARGE = "too_large"  # past a size limit (limits.py) or the compile's time budget: refused, nothing else is tried


class GrammarError(ValueError):
    """An invalid or unsupported regex / JSON Schema / grammar; the message names the problem, and
    `kind` says what it means for the source as a whole (set by the raiser, read by callers: never
    parse the message)."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.INVALID) -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self) -> tuple[type[GrammarError], tuple[str, ErrorKind]]:
        return type(self), (str(self), self.kind)  # pickled with its kind (ValueError's keeps only the message)
