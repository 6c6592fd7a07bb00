"""JSON Schema -> regex, doing better than outlines-core alone where it is weak.

Before `build_regex_from_schema` the schema is normalised:

- local `$ref`s (`#/$defs/...`, `#/definitions/...`) are inlined (recursive ones are refused);
- `allOf` is merged into one schema (outlines-core alone emits invalid JSON for it);
- integer `minimum` / `maximum` (and the exclusive forms) become an exact digit pattern;
- keywords that would otherwise be silently ignored are refused with a message naming them;
- string lengths past `MAX_STRING_LENGTH` are refused (each counted character is a copy of the
  string-character automaton: ~20 DFA states; regex_dfa.py caps the DFA at MAX_DFA_STATES).

Whitespace between tokens is bounded by default (`DEFAULT_WHITESPACE`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from outlines_core.json_schema import build_regex_from_schema

from loom.runtime.constrained.errors import GrammarError

DEFAULT_WHITESPACE = r"[ ]?"
# A counted string length n costs ~20 n DFA states (regex_dfa.py; about 1 s per 15k states to build):
# refuse beyond, naming the keyword, rather than fail on the automaton's size limit.
MAX_STRING_LENGTH = 1000
_UNENFORCED = ("multipleOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
               "dependentSchemas", "contains", "minContains", "maxContains", "unevaluatedProperties",
               "propertyNames", "minProperties", "maxProperties")  # fmt: skip
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_PLACEHOLDER = "LOOMINT{}"


def schema_to_regex(source: str, whitespace_pattern: str = DEFAULT_WHITESPACE) -> str:
    """A JSON Schema (as a JSON string) -> a regex whose matches validate against it.

    Raises GrammarError naming the keyword or the problem when the schema is invalid or uses
    something this backend cannot enforce."""
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if schema is True:
        schema = {}  # any JSON value
    elif schema is False:
        raise GrammarError("json_schema false admits no value")
    norm = _Normaliser(schema)
    schema = norm.walk(schema, "#", ())
    try:
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=whitespace_pattern)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"json_schema cannot be compiled: {e}") from None
    for i, pattern in enumerate(norm.int_patterns):  # absent where unreachable (e.g. maxItems 0)
        regex = regex.replace(f'"{_PLACEHOLDER.format(i)}"', f"({pattern})")
    return regex


class _Normaliser:
    def __init__(self, root: Any) -> None:
        self.root = root
        self.int_patterns: list[str] = []

    def walk(self, node: Any, path: str, refs: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [self.walk(x, f"{path}/{i}", refs) for i, x in enumerate(node)]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise GrammarError(f"json_schema: recursive $ref {ref!r} at {path} is not supported yet")
            target = self._resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            merged = _merge(target, rest, path) if rest else target
            return self.walk(merged, path, refs + (ref,))
        if "allOf" in node:
            parts = node["allOf"]
            if not isinstance(parts, list) or not parts:
                raise GrammarError(f"json_schema: allOf at {path} must be a non-empty list")
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for i, part in enumerate(parts):
                merged = _merge(merged, self.walk(part, f"{path}/allOf/{i}", refs), f"{path}/allOf/{i}")
            return self.walk(merged, path, refs)
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key in ("$defs", "definitions"):
                continue  # inlined where referenced
            if key in ("properties",) and isinstance(value, dict):
                out[key] = {name: self.walk(sub, f"{path}/properties/{name}", refs) for name, sub in value.items()}
            elif key in ("items", "additionalProperties", "anyOf", "oneOf", "prefixItems"):
                out[key] = self.walk(value, f"{path}/{key}", refs)
            else:
                out[key] = value
        types = out.get("type")
        if isinstance(types, list):  # one branch per type, each with the keywords that apply to it
            if not types:
                raise GrammarError(f"json_schema: 'type' at {path} is an empty list")
            branches = [self.walk(_for_type(out, t), path, refs) for t in dict.fromkeys(types)]
            return branches[0] if len(branches) == 1 else {"anyOf": branches}
        return self._check(out, path)

    def _resolve(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"json_schema: only local $ref ('#/...') is supported, got {ref!r} at {path}")
        node = self.root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise GrammarError(f"json_schema: $ref {ref!r} at {path} points at nothing")
        return node

    def _check(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        for key in _UNENFORCED:
            if key in node:
                raise GrammarError(f"json_schema: keyword {key!r} at {path} cannot be enforced by this backend")
        if node.get("uniqueItems") is True:
            raise GrammarError(f"json_schema: keyword 'uniqueItems' at {path} cannot be enforced by this backend")
        for key in ("maxLength", "minLength"):
            if key in node and isinstance(node[key], int) and node[key] > MAX_STRING_LENGTH:
                raise GrammarError(
                    f"json_schema: {key}={node[key]} at {path} is too large to compile (limit {MAX_STRING_LENGTH}); "
                    "use a 'pattern' or a smaller bound"
                )
        bounds = [k for k in _BOUNDS if k in node]
        if not bounds:
            return node
        if node.get("type") != "integer":
            raise GrammarError(
                f"json_schema: {bounds[0]!r} at {path} is only enforced on type 'integer', not {node.get('type')!r}"
            )
        lo, hi = _integer_bounds(node, path)
        self.int_patterns.append(integer_range_regex(lo, hi))
        rest = {k: v for k, v in node.items() if k not in _BOUNDS and k != "type"}
        if rest and set(rest) - {"description", "title", "default", "examples", "$comment"}:
            raise GrammarError(f"json_schema: integer bounds at {path} cannot be combined with {sorted(rest)}")
        return {"const": _PLACEHOLDER.format(len(self.int_patterns) - 1)}


_TYPE_KEYWORDS = {
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties"},
}
_TYPED = set().union(*_TYPE_KEYWORDS.values())


def _for_type(node: dict[str, Any], type_name: Any) -> dict[str, Any]:
    """`node` with a single `type`, keeping only the keywords that constrain that type."""
    if type_name not in _TYPE_KEYWORDS and type_name not in ("boolean", "null"):
        raise GrammarError(f"json_schema: unknown type {type_name!r}")
    keep = _TYPE_KEYWORDS.get(type_name, set())
    return {**{k: v for k, v in node.items() if k not in _TYPED or k in keep}, "type": type_name}


def _integer_bounds(node: dict[str, Any], path: str) -> tuple[int | None, int | None]:
    import math

    lo = hi = None
    for key in _BOUNDS:
        value = node.get(key)
        if value is None or isinstance(value, bool):
            continue
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise GrammarError(f"json_schema: {key} at {path} must be a finite number, got {value!r}")
        if key == "minimum":
            b = math.ceil(value)
            lo = b if lo is None else max(lo, b)
        elif key == "exclusiveMinimum":
            b = math.floor(value) + 1
            lo = b if lo is None else max(lo, b)
        elif key == "maximum":
            b = math.floor(value)
            hi = b if hi is None else min(hi, b)
        else:
            b = math.ceil(value) - 1
            hi = b if hi is None else min(hi, b)
    if lo is not None and hi is not None and lo > hi:
        raise GrammarError(f"json_schema: integer bounds at {path} admit no value ({lo} > {hi})")
    return lo, hi


def _merge(a: Any, b: Any, path: str) -> dict[str, Any]:
    """allOf / $ref-with-siblings: one schema that requires both."""
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise GrammarError(f"json_schema: cannot merge non-object schemas at {path}")
    out = dict(a)
    for key, value in b.items():
        if key not in out:
            out[key] = value
        elif key == "properties":
            props = dict(out[key])
            for name, sub in value.items():
                props[name] = _merge(props[name], sub, f"{path}/properties/{name}") if name in props else sub
            out[key] = props
        elif key == "required":
            out[key] = list(dict.fromkeys(list(out[key]) + list(value)))
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems"):
            out[key] = min(out[key], value)
        elif out[key] != value and key not in ("description", "title", "$comment", "examples"):
            raise GrammarError(f"json_schema: allOf at {path} has conflicting {key!r} ({out[key]!r} vs {value!r})")
    return out


# ----------------------------------------------------------------------------- integer ranges


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex matching exactly the canonical decimal integers in [lo, hi] (None: unbounded)."""
    parts: list[str] = []
    if lo is None or lo < 0:  # negative side: -(magnitudes in [max(1, -hi), -lo])
        neg_lo = 1 if hi is None or hi >= 0 else -hi
        neg_hi = None if lo is None else -lo
        if neg_hi is None or neg_lo <= neg_hi:
            parts.append("-(" + _nonneg_range(neg_lo, neg_hi) + ")")
    if hi is None or hi >= 0:
        parts.append(_nonneg_range(max(lo, 0) if lo is not None else 0, hi))
    return "|".join(parts)


def _nonneg_range(lo: int, hi: int | None) -> str:
    if hi is None:  # [lo, inf): everything with more digits than lo, plus [lo, 99..9]
        n = len(str(lo))
        more = f"[1-9][0-9]{{{n},}}"
        return more + "|" + _bounded(lo, 10**n - 1)
    return _bounded(lo, hi)


def _bounded(lo: int, hi: int) -> str:
    """Alternatives for [lo, hi], lo >= 0, split into equal-digit-count ranges, longest first:
    outlines-core's automaton is leftmost-first, so a shorter alternative listed first would
    hide the longer numbers it prefixes."""
    groups: list[list[str]] = []
    while lo <= hi:
        n = len(str(lo))
        top = min(hi, 10**n - 1)
        groups.append(_same_length(str(lo), str(top)))
        lo = top + 1
    return "|".join(alt for group in reversed(groups) for alt in group)


def _same_length(lo: str, hi: str) -> list[str]:
    """[lo, hi] for digit strings of equal length, as a list of digit-class sequences."""
    if len(lo) == 1:
        return [f"[{lo}-{hi}]" if lo != hi else lo]
    if lo[0] == hi[0]:
        return [re.escape(lo[0]) + f"(?:{'|'.join(_same_length(lo[1:], hi[1:]))})"]
    n = len(lo) - 1
    out: list[str] = []
    a, b = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * n:
        out += [lo[0] + f"(?:{'|'.join(_same_length(lo[1:], '9' * n))})"]
        a += 1
    tail_full = hi[1:] == "9" * n
    last = b if tail_full else b - 1
    if a <= last:
        out.append((f"[{a}-{last}]" if a != last else str(a)) + f"[0-9]{{{n}}}")
    if not tail_full:
        out.append(hi[0] + f"(?:{'|'.join(_same_length('0' * n, hi[1:]))})")
    return out
