"""JSON Schema -> regex, doing better than outlines-core alone where it is weak.

    schema_to_regex(source, whitespace_pattern, open_objects) -> a regex for regex_dfa.CompiledRegex

Before `build_regex_from_schema` the schema is normalised (schema_normaliser.py's rewrites, walked
here), and the parts outlines-core cannot build, or builds wrongly, are written by Loom
(json_regex.py) and pasted in for placeholders:

- local `$ref`s are inlined (recursive ones are refused); `allOf` is merged into one schema
  (outlines-core alone emits invalid JSON for it);
- integer `minimum` / `maximum` (and the exclusive forms) become an exact digit pattern;
- `oneOf` becomes an `anyOf` of branches that exclude one another where that can be proven
  (`exclusive_one_of`; outlines-core reads every `oneOf` as `anyOf`);
- keywords that would otherwise be silently ignored are refused with a message naming them;
- string lengths past `MAX_STRING_LENGTH` are refused (each counted character is a copy of the
  string-character automaton: ~20 DFA states; regex_dfa.py caps the DFA at MAX_DFA_STATES).

Whitespace between tokens is bounded by default (`DEFAULT_WHITESPACE`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from outlines_core.json_schema import INTEGER, NUMBER, STRING, STRING_INNER, build_regex_from_schema

from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.json_regex import (
    DEFAULT_WHITESPACE,
    any_json_regex,
    format_body,
    integer_range_regex,
    json_literal_regex,
    json_string_body,
    number_range_regex,
    other_key_regex,
)
from loom.runtime.constrained.regex_pieces import RegexPieces
from loom.runtime.constrained.schema_normaliser import (
    ANNOTATIONS,
    BOUNDS,
    FORBIDDEN,
    SchemaNormaliser,
    declare_required,
    drop_excluded,
    filter_enum,
    for_type,
    integer_bounds,
    merge_schemas,
    parse_schema,
)

# A counted string length n costs ~20 n DFA states (regex_dfa.py; about 1 s per 15k states to build):
# refuse beyond, naming the keyword, rather than fail on the automaton's size limit.
MAX_STRING_LENGTH = 1000
_UNENFORCED = ("multipleOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
               "dependentSchemas", "contains", "minContains", "maxContains", "unevaluatedProperties",
               "propertyNames", "minProperties", "maxProperties")  # fmt: skip
# outlines-core's own regexes for JSON strings, their characters (counted for lengths) and numbers:
# the same in every schema, so parsed once per process too (regex_pieces.py)
_OUTLINES_ATOMS = (STRING, STRING_INNER, NUMBER, INTEGER)
_PLACEHOLDER = "LOOMSUB{}"  # a const outlines-core spells as-is, replaced by one of _RegexNormaliser.subs
_ANY_ORDER_REQUIRED = 3  # up to 3 required members of an open object in any order (16 copies of each)
_ANY_ORDER_MAX_SIZE = 200_000  # ...while its regex, placeholders filled in, stays below this many characters


def schema_to_regex(source: str, whitespace_pattern: str = DEFAULT_WHITESPACE, open_objects: bool = False) -> str:
    """A JSON Schema (as a JSON string) -> a regex whose matches validate against it.

    Objects admit properties beyond `properties` where `additionalProperties` says so (true or a
    schema). Where it is absent, JSON Schema admits any, but generation wants the declared ones
    (as outlines, xgrammar's strict mode and OpenAI's structured outputs do): closed, unless
    `open_objects` (MaskBench-style checking of instances written by others).

    Raises GrammarError naming the keyword or the problem when the schema is invalid or uses
    something this backend cannot enforce (kind MALFORMED where it is not JSON, EMPTY where it is
    `false`)."""
    return schema_regexes(source, whitespace_pattern, open_objects)[0]


class RegexTooLong(GrammarError):
    """schema_regexes' regex would pass its `max_chars`: `size` characters."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"json_schema: its regex is {size} characters (limit {limit})")
        self.size = size


def schema_regexes(
    source: str, whitespace_pattern: str = DEFAULT_WHITESPACE, open_objects: bool = False, max_chars: int | None = None
) -> tuple[str, RegexPieces | None]:
    """schema_to_regex's regex, and the same regex with its pieces (formats, patterns, any JSON
    value, number ranges, enums of objects: Loom's own leaf regexes) left as sentinels, for
    nfa.build_nfa to splice their cached fragments (regex_pieces.py); None where it has none.
    Raises GrammarError, before spelling it, where the regex would pass `max_chars` characters."""
    schema = parse_schema(source)
    norm = _RegexNormaliser(schema, whitespace_pattern, open_objects)
    schema = norm.walk(schema, "#", ())
    try:
        template = build_regex_from_schema(json.dumps(schema), whitespace_pattern=whitespace_pattern)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"json_schema cannot be compiled: {e}") from None
    if max_chars is not None and (size := norm._expanded_size(template)) > max_chars:  # spelling it would take seconds
        raise RegexTooLong(size, max_chars)
    regex = template
    for i in reversed(range(len(norm.subs))):  # a sub holds only earlier ones; absent where unreachable (maxItems 0)
        regex = regex.replace(f'"{_PLACEHOLDER.format(i)}"', f"({norm.subs[i]})")
    return regex, RegexPieces.fill(template, norm.subs, norm.leaves, f'"{_PLACEHOLDER}"', _OUTLINES_ATOMS)


class _RegexNormaliser(SchemaNormaliser):
    """The walk from a schema to one outlines-core builds right: the shared rewrites, then the
    leaves outlines-core gets wrong as placeholders for regexes of Loom's own (`subs`)."""

    def __init__(self, root: Any, whitespace: str = DEFAULT_WHITESPACE, open_objects: bool = False) -> None:
        super().__init__(root)
        self.whitespace = whitespace
        self.open_objects = open_objects
        self._any: str | None = None
        self.subs: list[str] = []  # regexes outlines-core cannot build (or builds wrongly), by placeholder
        self.leaves: set[int] = set()  # the subs holding no placeholder (the pieces of regex_pieces.py)
        self._sizes: dict[int, int] = {}  # expanded size of each sub (_expanded_size)

    def walk(self, node: Any, path: str, refs: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [self.walk(x, f"{path}/{i}", refs) for i, x in enumerate(node)]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise GrammarError(f"json_schema: recursive $ref {ref!r} at {path} is not supported yet")
            target = self.resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            merged = merge_schemas(target, rest, path) if rest else target
            return self.walk(merged, path, refs + (ref,))
        if "allOf" in node:
            parts = node["allOf"]
            if not isinstance(parts, list) or not parts:
                raise GrammarError(f"json_schema: allOf at {path} must be a non-empty list")
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for i, part in enumerate(parts):  # merged as written (placeholders do not merge), then walked
                part, refs = self.deref(part, f"{path}/allOf/{i}", refs)
                merged = merge_schemas(merged, part, f"{path}/allOf/{i}")
            return self.walk(merged, path, refs)
        if isinstance(node.get("oneOf"), list) and node["oneOf"]:
            exact = self.exclusive_one_of(node, path, refs)
            if exact is not None:
                return self.walk(exact, path, refs)
        for key in ("anyOf", "oneOf"):
            siblings = {k: v for k, v in node.items() if k != key and k not in ANNOTATIONS and k not in ("$defs", "definitions")}
            if isinstance(node.get(key), list) and siblings:  # outlines-core reads the branches alone
                return self.walk(self.distribute(node, key, siblings, path, refs), path, refs)
        node = drop_excluded(node, path)
        out: dict[str, Any] = {}
        for key, value in declare_required(node, path).items():
            if key in ("$defs", "definitions"):
                continue  # inlined where referenced
            if key in ("properties",) and isinstance(value, dict):
                out[key] = {name: self.walk({} if sub is True else sub, f"{path}/properties/{name}", refs)
                            for name, sub in value.items()}  # fmt: skip
            elif key in ("anyOf", "oneOf", "prefixItems") and isinstance(value, list):
                out[key] = [self.walk({} if sub is True else sub, f"{path}/{key}/{i}", refs) for i, sub in enumerate(value)]
            elif key in ("items", "additionalProperties", "anyOf", "oneOf", "prefixItems"):
                out[key] = self.walk(value, f"{path}/{key}", refs)
            else:
                out[key] = value
        types = out.get("type")
        if isinstance(types, list) and (isinstance(out.get("enum"), list) or "const" in out):
            out = filter_enum(out, path)  # the values decide the types (a branch per type might hold none)
            types = out.get("type")
        if isinstance(types, list):  # one branch per type, each with the keywords that apply to it
            if not types:
                raise GrammarError(f"json_schema: 'type' at {path} is an empty list")
            branches = [self.walk(for_type(out, t), path, refs) for t in dict.fromkeys(types)]
            return branches[0] if len(branches) == 1 else {"anyOf": branches}
        if isinstance(types, str):  # keywords of the other types do not apply (outlines-core reads them anyway)
            out = for_type(out, types)
        return self._check(out, path)

    def _sub(self, regex: str, leaf: bool = True) -> dict[str, Any]:
        """A placeholder for `regex`; leaf: it holds no placeholder of another sub."""
        if leaf:
            self.leaves.add(len(self.subs))
        self.subs.append(regex)
        return {"const": _PLACEHOLDER.format(len(self.subs) - 1)}

    def _check(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        if isinstance(node.get("enum"), list) or "const" in node:
            node = filter_enum(node, path)
            values = node["enum"] if "enum" in node else [node["const"]]
            if any(isinstance(v, (list, dict)) for v in values):
                # outlines-core spells an object's keys unescaped (JSON and regex alike): {"a\"b": 1}
                # came out as {"a"b": 1}, and a key holding `+` or `\d` matched other text.
                return self._sub("|".join(f"(?:{json_literal_regex(v, self.whitespace)})" for v in values))
        if not set(node) - ANNOTATIONS:
            # Any JSON value. outlines-core 0.2.14 emits its alternatives without a group, so inside an
            # object or array the `|` splits the whole regex (`{"x":` + `true`, or a bare `null`).
            return self._sub(self._any_value())
        if "pattern" in node and "enum" not in node and "const" not in node:
            return self._string_pattern(node, path)
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
        if "format" in node and node.get("type", "string") == "string" and "enum" not in node and "const" not in node:
            node = self._format(node, path)
            if "const" in node:
                return node
        bounds = [k for k in BOUNDS if k in node]
        if not bounds:
            extra = node.get("additionalProperties", True if self.open_objects else False)
            props = node.get("properties")
            # Loom builds the object where outlines-core cannot: undeclared members, and keys JSON must
            # escape (outlines-core writes them raw, so {"a\"b": 1} came out as {"a"b": 1}).
            escaped = props and any(json.dumps(name, ensure_ascii=False) != f'"{name}"' for name in props)
            if props and (extra is not False or self.open_objects or escaped) and node.get("type", "object") == "object":
                return self._object(node, extra)
            return node
        if node.get("type") not in ("integer", "number"):
            raise GrammarError(
                f"json_schema: {bounds[0]!r} at {path} is only enforced on types 'integer' and 'number', not {node.get('type')!r}"
            )
        rest = {k: v for k, v in node.items() if k not in BOUNDS and k != "type"}
        if set(rest) & {"anyOf", "oneOf", "allOf", "enum", "const"}:
            raise GrammarError(f"json_schema: bounds at {path} cannot be combined with {sorted(set(rest) - ANNOTATIONS)}")
        if node["type"] == "integer":
            lo, hi = integer_bounds(node, path)
            return self._sub(integer_range_regex(lo, hi))
        return self._sub(number_range_regex(node, path))

    def _any_value(self) -> str:
        if self._any is None:
            self._any = any_json_regex(self.whitespace)
        return self._any

    def _regex(self, node: Any) -> str:
        """The regex of an already-walked subschema (placeholders inside are filled in later)."""
        if node is True or node == {}:
            return self._any_value()
        try:
            return build_regex_from_schema(json.dumps(node), whitespace_pattern=self.whitespace)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"json_schema cannot be compiled: {e}") from None

    def _object(self, node: dict[str, Any], extra: Any) -> dict[str, Any]:
        """An object with `properties`, admitting undeclared ones (keys differing from every declared
        one, values per `extra`) unless `extra` is False; outlines-core drops them whenever
        `properties` is given, and keeps declared order.

        Each property's regex is written once where it can be (the DFA is not minimised, so a regex
        written n times costs n times its states, and nested objects multiply). With nothing
        required, members come in any order: one loop over them (a repeated key still validates: each
        value satisfies its schema). Otherwise the required members keep declared order, with the
        optional ones before the first required one spelled as a few prefixes, and undeclared ones
        after, which keeps generation's keys forced. With `open_objects` (instances written by
        others) every member comes in any order: a tree of the required members' orders (e + e/2 + ...
        copies of each, up to `_ANY_ORDER_REQUIRED` of them) with the others looping between, where
        that is not too large."""
        ws, required = self.whitespace, set(node.get("required") or ())
        other = None  # an undeclared member
        if extra is not False:
            value = f"(?:{self._any_value() if extra is True else self._regex(extra)})"
            other = f"{other_key_regex([*node['properties'], *node.get(FORBIDDEN, ())])}{ws}:{ws}{value}"
        props = [(name in required, re.escape(json.dumps(name, ensure_ascii=False)) + f"{ws}:{ws}(?:{self._regex(sub)})")
                 for name, sub in node["properties"].items()]  # fmt: skip
        sep = f"{ws},{ws}"
        first_required = next((i for i, (req, _) in enumerate(props) if req), None)
        loose = [p for req, p in props if not req] + ([other] if other else [])
        if first_required is None:
            member = "(?:" + "|".join(loose) + ")"
            body = f"(?:{member}(?:{sep}{member})*)?"
        elif self.open_objects and (body := self._any_order([p for req, p in props if req], loose, sep)) is not None:
            pass
        else:
            r = first_required
            tail = f"(?:{sep}{other})*" if other else ""
            for req, prop in reversed(props[r + 1 :]):
                tail = (f"{sep}{prop}" if req else f"(?:{sep}{prop})?") + tail
            heads = [""] + [props[k][1] + "".join(f"(?:{sep}{p})?" for _, p in props[k + 1 : r]) + sep for k in range(r)]
            body = "(?:" + "|".join(heads) + ")" + props[r][1] + tail
        return self._sub(f"\\{{{ws}{body}{ws}\\}}", leaf=False)

    def _any_order(self, required: list[str], loose: list[str], sep: str) -> str | None:
        """The members of an object holding each of `required` (member regexes) in any order, with
        `loose` ones before, between and after; None where it would be too large to build."""
        if len(required) > _ANY_ORDER_REQUIRED:
            return None
        between = f"(?:{sep}(?:{'|'.join(loose)}))*" if loose else ""

        def orders(left: tuple[int, ...]) -> str:
            alts = []
            for k in left:
                rest = tuple(j for j in left if j != k)
                alts.append(required[k] + between + (f"{sep}{orders(rest)}" if rest else ""))
            return "(?:" + "|".join(alts) + ")"

        before = f"(?:(?:{'|'.join(loose)}){sep})*" if loose else ""
        body = before + orders(tuple(range(len(required))))
        return body if self._expanded_size(body) <= _ANY_ORDER_MAX_SIZE else None

    def _expanded_size(self, regex: str) -> int:
        """The length of `regex` once its placeholders are filled in (each is a copy)."""
        size = len(regex)
        for i in map(int, re.findall(_PLACEHOLDER.format("([0-9]+)"), regex)):
            if i not in self._sizes:
                self._sizes[i] = self._expanded_size(self.subs[i])
            size += self._sizes[i]
        return size

    def _format(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        """A string `format`: outlines-core's regex for it (date, time, uuid, email, uri...), spelled
        as JSON text by json_string_body (its email and uri regexes admit raw quotes, backslashes and
        control characters). `jsonschema` does not assert formats, so one this backend cannot
        spell, or one beside a length or a pattern (outlines-core would drop those), is left out."""
        rest = {k: v for k, v in node.items() if k != "format"}
        if set(node) & {"pattern", "minLength", "maxLength"}:
            return rest
        body = format_body(node["format"])
        return rest if body is None else self._sub('"' + body + '"')

    def _string_pattern(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        """A string `pattern` as a regex over the JSON text of the string: outlines-core pastes the
        pattern between the quotes as it is, so a `\\n`, `"`, `\\\\` or `[^x]` in it matched raw
        control characters, quotes and backslashes (invalid JSON)."""
        if node.get("type", "string") != "string":
            raise GrammarError(f"json_schema: 'pattern' at {path} is only enforced on type 'string', not {node['type']!r}")
        for key in ("minLength", "maxLength"):
            if key in node:
                raise GrammarError(f"json_schema: {key!r} together with 'pattern' at {path} cannot be enforced by this backend")
        rest = set(node) & {*_UNENFORCED, "anyOf", "oneOf", "allOf"}
        if rest:
            raise GrammarError(f"json_schema: 'pattern' at {path} cannot be combined with {sorted(rest)}")
        return self._sub('"' + json_string_body(node["pattern"], f"'pattern' at {path}") + '"')
