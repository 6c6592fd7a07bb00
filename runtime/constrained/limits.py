"""How large a grammar may be: limits checked on the source before any automaton is built.

    GrammarLimits()                              the defaults (runtime/grammar_limits.py); GrammarBackend(limits=...) takes others
    check_source(kind, source, limits)           raises GrammarError(kind TOO_LARGE) naming the keyword and the limit

A schema's size is not its length: a 58-byte schema with `"maxLength": 400000` asked for an
automaton of millions of states and held a compile thread for minutes. So the numbers that
multiply work are bounded where the user wrote them (string lengths, item counts, `{m,n}`
repetitions, nesting, the size a regex expands to), and the refusal says which keyword, where,
and which limit; the compile itself still runs under a time budget (backend.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.regex_syntax import REPEAT_OPS, sre_constants, sre_parse
from loom.runtime.grammar_limits import GrammarLimits, flag_name


def refuse(limits: GrammarLimits, what: str, value: int, limit_name: str, where: str = "") -> GrammarError:
    """'{what} {value} at {where} exceeds the limit of N (limit: GrammarLimits.{limit_name}, its flag)',
    kind TOO_LARGE."""
    at = f" at {where}" if where else ""
    limit = getattr(limits, limit_name)
    return GrammarError(f"{what} {value}{at} exceeds the limit of {limit} (limit: GrammarLimits.{limit_name}, {flag_name(limit_name)})",
                        ErrorKind.TOO_LARGE)  # fmt: skip


def check_source(kind: str, source: str, limits: GrammarLimits) -> None:
    """Refuse a grammar source past `limits` (GrammarError of kind TOO_LARGE); the rest of its
    checking is the compilers'. Cheap: one walk of the parsed schema or regex."""
    if len(source) > limits.max_source_chars:
        raise refuse(limits, f"{kind}: the source has", len(source), "max_source_chars")
    if kind == "regex":
        check_regex(source, "regex", limits)
    elif kind in ("ebnf", "lark"):
        depth = _group_depth(source, _GROUP_TOKENS[kind])
        if depth > limits.max_nesting:  # (the grammar readers recurse per level: ~300 levels was a RecursionError)
            raise refuse(limits, f"{kind}: groups nested", depth, "max_nesting")
    elif kind == "json_schema":
        try:
            schema = json.loads(source)
        except RecursionError:
            raise GrammarError(f"json_schema: nesting exceeds the limit of {limits.max_nesting} (limit: GrammarLimits.max_nesting, "
                               f"{flag_name('max_nesting')})",
                               ErrorKind.TOO_LARGE) from None  # fmt: skip
        except json.JSONDecodeError:
            return  # parse_schema says what is wrong with it
        _check_schema(schema, limits)


def _group_depth(source: str, tokens: re.Pattern[str]) -> int:
    """How deep groups (`(`, and Lark's `[`) nest in an EBNF / Lark grammar; string literals,
    character classes, regexes and comments are read past (a bracket left unpaired outside them is
    a syntax error, which the grammar's reader reports)."""
    depth = deepest = 0
    for m in tokens.finditer(source):
        c = m.group()
        if c in "([":
            depth += 1
            deepest = max(deepest, depth)
        elif c in ")]":
            depth = max(0, depth - 1)
    return deepest


_STRING = r'"(?:\\.|[^"\\\n])*"'
_GROUP_TOKENS = {
    "ebnf": re.compile(rf"{_STRING}|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[()]"),  # GBNF: `[...]` is a character class
    "lark": re.compile(rf"{_STRING}|//[^\n]*|#[^\n]*|/(?!/)(?:\\.|[^/\\\n])*/|[()\[\]]"),
}


def _check_schema(schema: Any, limits: GrammarLimits) -> None:
    todo: list[tuple[Any, str, int]] = [(schema, "#", 0)]
    while todo:
        node, path, depth = todo.pop()
        if depth > limits.max_nesting:
            raise refuse(limits, "json_schema: nesting depth", depth, "max_nesting", path)
        if isinstance(node, list):
            todo += [(v, f"{path}/{i}", depth + 1) for i, v in enumerate(node)]
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            where = f"{path}/{key}"
            if key in ("enum", "const", "default", "examples"):
                continue  # values, not schemas (their size is the source's)
            if isinstance(value, int) and not isinstance(value, bool):
                if key in ("minLength", "maxLength") and value > limits.max_string_length:
                    raise refuse(limits, f"json_schema: {key}", value, "max_string_length", path)
                if key in ("minItems", "maxItems") and value > limits.max_items:
                    raise refuse(limits, f"json_schema: {key}", value, "max_items", path)
            elif key == "pattern" and isinstance(value, str):
                check_regex(value, f"json_schema: 'pattern' at {path}", limits)
            elif key == "patternProperties" and isinstance(value, dict):
                for pattern in value:
                    check_regex(pattern, f"json_schema: 'patternProperties' key at {path}", limits)
            if isinstance(value, (dict, list)):
                todo.append((value, where, depth + 1))


def check_regex(pattern: str, where: str, limits: GrammarLimits) -> None:
    """Refuse a regex whose repetition counts, nesting or unrolled size are past `limits`. One that
    does not parse is left to the compiler, which says why."""
    try:
        parsed = sre_parse.parse(pattern, 0)
    except re.error:
        return
    except RecursionError:
        raise refuse(limits, f"{where}: group nesting is over", limits.max_nesting, "max_nesting") from None
    size = _regex_size(list(parsed.data), where, limits, 0)
    if size > limits.max_regex_size:
        raise refuse(limits, f"{where}: unrolled, the regex has", size, "max_regex_size")


def _regex_size(items: list, where: str, limits: GrammarLimits, depth: int) -> int:
    """The atoms `items` expand to once every {m,n} is unrolled (an unbounded repeat counts once more)."""
    if depth > limits.max_nesting:
        raise refuse(limits, f"{where}: group nesting is over", limits.max_nesting, "max_nesting")
    size = 0
    for op, av in items:
        if op is sre_constants.SUBPATTERN:
            size += _regex_size(list(av[3].data), where, limits, depth + 1)
        elif op is sre_constants.BRANCH:
            size += sum(_regex_size(list(alt.data), where, limits, depth + 1) for alt in av[1])
        elif op in REPEAT_OPS:
            lo, hi, sub = av
            count = lo + 1 if hi is sre_constants.MAXREPEAT else hi
            if max(lo, 0 if hi is sre_constants.MAXREPEAT else hi) > limits.max_repeat:
                bound = f"{{{lo},}}" if hi is sre_constants.MAXREPEAT else f"{{{lo},{hi}}}"
                raise refuse(limits, f"{where}: the repetition {bound} counts", max(lo, count), "max_repeat")
            size += max(count, 1) * _regex_size(list(sub.data), where, limits, depth + 1)
        else:
            size += 1
        if size > limits.max_regex_size:
            return size  # refused by the caller; no need to add up the rest
    return size
