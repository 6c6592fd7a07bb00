"""Regexes for pieces of JSON text, shared by the schema compilers (schema.py, schema_grammar.py).

    any_json_regex(ws)              any JSON value (nested one level by default)
    json_literal_regex(value, ws)   one value's JSON text (`const` / `enum`)
    json_string_body(pattern, ...)  the text between a string's quotes whose value matches `pattern`
    other_key_regex(names)          a quoted key differing from every one of `names`
    format_body(format)             a string `format` (date, time, uuid, email...) as JSON text
    integer_range_regex(lo, hi)     the canonical integers in [lo, hi]
    number_range_regex(node, path)  plain decimals within a `number` schema's bounds

Whitespace between tokens is a parameter (`ws`), bounded by default (DEFAULT_WHITESPACE).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from outlines_core.json_schema import build_regex_from_schema

from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.regex_syntax import (
    ALL_CODEPOINTS,
    REPEAT_OPS,
    Ranges,
    case_variants,
    class_item_ranges,
    complement_ranges,
    encodable_ranges,
    normalise_ranges,
    sre_constants,
    sre_parse,
)

DEFAULT_WHITESPACE = r"[ ]?"


def any_json_regex(ws: str, depth: int = 1) -> str:
    """Any JSON value nested at most `depth` arrays / objects deep: a few hundred characters (outlines-core's
    `{}` regex is ~14k, and a schema with several open objects grew past the automaton's limits)."""
    string = '"(?:[^"\\\\\\x00-\\x1f]|\\\\["\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4})*"'
    value = f"(?:{string}|-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)"
    for _ in range(depth):
        array = f"\\[{ws}(?:{value}(?:{ws},{ws}{value})*)?{ws}\\]"
        member = f"{string}{ws}:{ws}{value}"
        obj = f"\\{{{ws}(?:{member}(?:{ws},{ws}{member})*)?{ws}\\}}"
        value = f"(?:{value}|{array}|{obj})"
    return value


def json_literal_regex(value: Any, ws: str) -> str:
    """The JSON text of one value (`const` / `enum`), with `ws` between the tokens of arrays and
    objects; keys and strings escaped as JSON writes them, then as a regex."""
    if isinstance(value, list):
        inner = f"{ws},{ws}".join(json_literal_regex(v, ws) for v in value)
        return f"\\[{ws}{inner}{ws}\\]"
    if isinstance(value, dict):
        inner = f"{ws},{ws}".join(f"{re.escape(json.dumps(k, ensure_ascii=False))}{ws}:{ws}{json_literal_regex(v, ws)}" for k, v in value.items())
        return f"\\{{{ws}{inner}{ws}\\}}"
    if isinstance(value, float) and value == int(value) and abs(value) < 1e15:
        return f"{int(value)}(?:\\.0+)?"  # 1.0 is written 1 as often as 1.0
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value}(?:\\.0+)?"
    return re.escape(json.dumps(value, ensure_ascii=False))


KEY_CHAR = '[^"\\\\\\x00-\\x1f]'  # a key character written as itself (other keys are spelled without escapes)


def other_key_regex(names: list[str]) -> str:
    """A quoted JSON key, written without escapes, equal to none of `names`: the complement of
    their trie."""
    trie: dict[str, Any] = {}
    for name in names:
        if all(re.fullmatch(KEY_CHAR, ch) for ch in name):  # a name needing escapes never collides
            node = trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[""] = {}

    def rest(node: dict[str, Any]) -> str:
        kids = [ch for ch in node if ch]
        alts = [] if "" in node else [""]  # stop here: this prefix is no name
        if kids:
            not_kid = "".join("\\" + ch if ch in "\\]^-[" else ch for ch in kids)
            alts.append(KEY_CHAR[:-1] + not_kid + "]" + KEY_CHAR + "*")
        else:
            alts.append(KEY_CHAR + "+")
        alts += [re.escape(ch) + rest(node[ch]) for ch in kids]
        return "(?:" + "|".join(alts) + ")"

    return '"' + rest(trie) + '"'


_FORMAT_BODIES: dict[str, str | None] = {}


# Dates as `jsonschema`'s format checker reads them (ISO dates that exist, Feb 29 in leap years only;
# RFC 3339 date-times and times with their offset), stricter than outlines-core's (2020-02-31, or no offset).
_YEAR = "(?:[1-9][0-9]{3}|0[1-9][0-9]{2}|00[1-9][0-9]|000[1-9])"
_LEAP = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (f"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
         f"|02-(?:0[1-9]|1[0-9]|2[0-8]))|{_LEAP}-02-29)")  # fmt: skip
_TIME = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]+)?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])".replace("\\\\", "\\")
_STRICT_FORMATS = {"date": _DATE, "time": _TIME, "date-time": f"{_DATE}T{_TIME}"}


def format_body(fmt: Any) -> str | None:
    if not isinstance(fmt, str):
        return None
    if fmt in _STRICT_FORMATS:
        return _STRICT_FORMATS[fmt]
    if fmt not in _FORMAT_BODIES:
        if len(_FORMAT_BODIES) >= 256:  # format names come from clients: keep the memo bounded
            _FORMAT_BODIES.clear()
        try:
            quoted = build_regex_from_schema(json.dumps({"type": "string", "format": fmt}))
            body = json_string_body("(?a)^(?:" + quoted[1:-1] + ")$", f"format {fmt!r}")
        except (ValueError, TypeError, GrammarError):
            body = None
        _FORMAT_BODIES[fmt] = body
    return _FORMAT_BODIES[fmt]


# ----------------------------------------------------------------------------- string patterns

_SHORT_ESCAPES = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}
_MUST_ESCAPE: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # control characters, '"', '\\'


_BODIES: dict[str, str] = {}  # pattern -> json_string_body's answer (a schema's regex and grammar paths both ask)
_BODIES_KEPT = 4096


def json_string_body(pattern: str, where: str) -> str:
    """json_string_body_of, kept per pattern (`where` only names it in errors, which are not kept):
    a Unicode class such as \\w spells hundreds of ranges, ~10 ms a pattern."""
    body = _BODIES.get(pattern)
    if body is None:
        body = json_string_body_of(pattern, where)
        if len(_BODIES) >= _BODIES_KEPT:
            _BODIES.clear()
        _BODIES[pattern] = body
    return body


def json_string_body_of(pattern: str, where: str) -> str:
    """A regex over the JSON text between a string's quotes whose decoded value `re.search`es
    `pattern` (Python's regex semantics, as `jsonschema` checks it): every character the pattern
    admits is spelled the way JSON allows, control characters as `\\n` / `\\u000a`, `"` as `\\"`.
    Unanchored ends admit any characters. Raises GrammarError naming `where` for invalid patterns
    and constructs with no automaton (look-arounds, back-references, inner anchors)."""
    try:
        parsed = sre_parse.parse(pattern, 0)
    except re.error as e:
        raise GrammarError(f"json_schema: {where} is not a valid regex: {e}") from None
    flags = parsed.state.flags
    items = list(parsed.data)
    branches = [items]
    if len(items) == 1 and items[0][0] is sre_constants.BRANCH:  # ^a|b$: anchors per alternative
        branches = [list(alt.data) for alt in items[0][1][1]]
    anything = f"(?:{_json_chars(list(ALL_CODEPOINTS))})*"
    out = []
    for branch in branches:
        head = bool(branch) and branch[0] == (sre_constants.AT, sre_constants.AT_BEGINNING) or branch[:1] == [(sre_constants.AT, sre_constants.AT_BEGINNING_STRING)]
        tail = bool(branch) and branch[-1][0] is sre_constants.AT and branch[-1][1] in (sre_constants.AT_END, sre_constants.AT_END_STRING)
        body = branch[int(head) : len(branch) - int(tail) if tail else None]
        out.append(("" if head else anything) + _emit(body, flags, where) + ("" if tail else anything))
    return out[0] if len(out) == 1 else "(?:" + "|".join(out) + ")"


def _emit(items: list, flags: int, where: str) -> str:
    return "".join(_emit_one(op, av, flags, where) for op, av in items)


def _emit_one(op: Any, av: Any, flags: int, where: str) -> str:
    if op in (sre_constants.LITERAL, sre_constants.NOT_LITERAL, sre_constants.IN, sre_constants.ANY):
        return _json_chars(_charset(op, av, flags, where))
    if op is sre_constants.SUBPATTERN:
        _group, add, remove, sub = av
        return "(?:" + _emit(list(sub.data), (flags | add) & ~remove, where) + ")"
    if op is sre_constants.BRANCH:
        return "(?:" + "|".join(_emit(list(alt.data), flags, where) for alt in av[1]) + ")"
    if op in REPEAT_OPS:
        lo, hi, sub = av
        bound = f"{{{lo},}}" if hi is sre_constants.MAXREPEAT else f"{{{lo},{hi}}}"
        return "(?:" + _emit(list(sub.data), flags, where) + ")" + bound
    names = {sre_constants.AT: "an anchor (^, $, \\b) inside the pattern", sre_constants.ASSERT: "a look-around", sre_constants.ASSERT_NOT: "a look-around",
             sre_constants.GROUPREF: "a back-reference"}  # fmt: skip
    raise GrammarError(f"json_schema: {where} uses {names.get(op, str(op))}, which this backend cannot enforce")


def _charset(op: Any, av: Any, flags: int, where: str) -> Ranges:
    """The code points one pattern atom admits (as nfa.py reads them)."""
    if op is sre_constants.ANY:
        return list(ALL_CODEPOINTS) if flags & re.DOTALL else complement_ranges([(10, 10)])
    if op is sre_constants.IN:
        items = list(av)
        negate = bool(items) and items[0][0] is sre_constants.NEGATE
        try:
            ranges = normalise_ranges([r for o, a in items[negate:] for r in class_item_ranges(o, a, flags, where)])
        except GrammarError:
            raise GrammarError(f"json_schema: {where} has a character class this backend cannot read") from None
    else:
        ranges, negate = [(av, av)], op is sre_constants.NOT_LITERAL
    if flags & re.IGNORECASE:
        ranges = case_variants(ranges)
    return complement_ranges(ranges) if negate else encodable_ranges(ranges)


def _json_chars(ranges: Ranges) -> str:
    """One character from `ranges` as JSON text: a raw character, or an escape for those JSON
    requires escaped (short escapes where JSON has them, and \\u00XX either way)."""
    plain = encodable_ranges(complement_ranges(complement_ranges(ranges) + _MUST_ESCAPE))  # ranges minus the must-escape set
    alts = [] if not plain else ["[" + "".join(_class_range(lo, hi) for lo, hi in plain) + "]"]
    for lo, hi in ranges:
        for cp in range(lo, min(hi, 0x5C) + 1):
            if cp < 0x20 or cp in (0x22, 0x5C):
                forms = [f"\\\\u00{_hex_class(cp >> 4)}{_hex_class(cp & 15)}"]
                if cp in _SHORT_ESCAPES:
                    forms.append("\\\\" + _SHORT_ESCAPES[cp])
                elif cp >= 0x20:
                    forms.append("\\\\" + re.escape(chr(cp)))
                alts += forms
    if not alts:
        return "[^\\x00-\\U0010ffff]"  # admits nothing
    return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _class_range(lo: int, hi: int) -> str:
    esc = lambda cp: f"\\U{cp:08x}"  # noqa: E731 - Python's regex parser reads these in classes
    return esc(lo) if lo == hi else f"{esc(lo)}-{esc(hi)}"


def _hex_class(d: int) -> str:
    h = f"{d:x}"
    return f"[{h}{h.upper()}]" if h.isalpha() else h


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


def number_range_regex(node: dict[str, Any], path: str) -> str:
    """Plain decimal numbers (no exponent) within a `number` schema's bounds, when those are integers."""
    def bound(*keys: str) -> tuple[int | None, bool]:
        best: tuple[float, bool] | None = None
        for key in keys:
            value = node.get(key)
            if value is None or isinstance(value, bool):
                continue
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GrammarError(f"json_schema: {key} at {path} must be a finite number, got {value!r}")
            if value != int(value):
                raise GrammarError(f"json_schema: {key!r} at {path} is {value}: only whole-number bounds are enforced on type 'number'")
            cand = (value, key.startswith("exclusive"))
            lower = keys[0] == "minimum"
            if best is None or (cand[0] > best[0] if lower else cand[0] < best[0]) or (cand[0] == best[0] and cand[1]):
                best = cand
        return (None, False) if best is None else (int(best[0]), best[1])

    lo, lo_x = bound("minimum", "exclusiveMinimum")
    hi, hi_x = bound("maximum", "exclusiveMaximum")
    parts = []
    if hi is None or hi > 0 or (hi == 0 and not hi_x):  # x >= 0
        below = (lo, lo_x) if lo is not None and lo >= 0 else (0, False)
        parts.append(_nonneg_decimal(*below, hi, hi_x))
    if lo is None or lo < 0:  # x <= 0, written -y
        y_lo = (-hi, hi_x) if hi is not None and hi <= 0 else (0, False)
        neg = _nonneg_decimal(*y_lo, None if lo is None else -lo, lo_x)
        parts.append(None if neg is None else "-(?:" + neg + ")")
    parts = [p for p in parts if p is not None]
    if not parts:
        raise GrammarError(f"json_schema: number bounds at {path} admit no value")
    return "|".join(parts)


def _nonneg_decimal(lo: int, lo_x: bool, hi: int | None, hi_x: bool) -> str | None:
    """Decimals y (0 <= lo <= y <= hi; strict where *_x) as integer part + optional fraction."""
    if hi is not None and (hi < lo or (hi == lo and (lo_x or hi_x))):
        return None
    alts = []
    any_lo, any_hi = lo + 1 if lo_x else lo, None if hi is None else hi - 1
    if any_hi is None or any_lo <= any_hi:
        alts.append(f"(?:{integer_range_regex(any_lo, any_hi)})(?:\\.[0-9]+)?")
    if lo_x:
        alts.append(f"{lo}\\.[0-9]*[1-9][0-9]*")
    if hi is not None and not hi_x:
        alts.append(f"{hi}(?:\\.0+)?")
    return "|".join(alts)
