"""JSON Schema -> regex, doing better than outlines-core alone where it is weak.

Before `build_regex_from_schema` the schema is normalised:

- local `$ref`s (`#/$defs/...`, `#/definitions/...`) are inlined (recursive ones are refused);
- `allOf` is merged into one schema (outlines-core alone emits invalid JSON for it);
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

from outlines_core.json_schema import build_regex_from_schema

from loom.runtime.constrained.ebnf_automaton import (
    _ALL,
    Ranges,
    _c,
    _case_variants,
    _complement,
    _intersect_all,
    _normalise,
    _p,
    _set_of,
)
from loom.runtime.constrained.errors import GrammarError

DEFAULT_WHITESPACE = r"[ ]?"
# A counted string length n costs ~20 n DFA states (regex_dfa.py; about 1 s per 15k states to build):
# refuse beyond, naming the keyword, rather than fail on the automaton's size limit.
MAX_STRING_LENGTH = 1000
_UNENFORCED = ("multipleOf", "not", "if", "then", "else", "patternProperties", "dependentRequired",
               "dependentSchemas", "contains", "minContains", "maxContains", "unevaluatedProperties",
               "propertyNames", "minProperties", "maxProperties")  # fmt: skip
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_PLACEHOLDER = "LOOMSUB{}"  # a const outlines-core spells as-is, replaced by one of _Normaliser.subs
_ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "$schema", "$id", "id", "deprecated",
                "readOnly", "writeOnly", "x-loom-forbidden"}  # fmt: skip


def schema_to_regex(source: str, whitespace_pattern: str = DEFAULT_WHITESPACE, open_objects: bool = False) -> str:
    """A JSON Schema (as a JSON string) -> a regex whose matches validate against it.

    Objects admit properties beyond `properties` where `additionalProperties` says so (true or a
    schema). Where it is absent, JSON Schema admits any, but generation wants the declared ones
    (as outlines, xgrammar's strict mode and OpenAI's structured outputs do): closed, unless
    `open_objects` (MaskBench-style checking of instances written by others).

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
    norm = _Normaliser(schema, whitespace_pattern, open_objects)
    schema = norm.walk(schema, "#", ())
    try:
        regex = build_regex_from_schema(json.dumps(schema), whitespace_pattern=whitespace_pattern)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"json_schema cannot be compiled: {e}") from None
    for i in reversed(range(len(norm.subs))):  # a sub holds only earlier ones; absent where unreachable (maxItems 0)
        regex = regex.replace(f'"{_PLACEHOLDER.format(i)}"', f"({norm.subs[i]})")
    return regex


class _Normaliser:
    def __init__(self, root: Any, whitespace: str = DEFAULT_WHITESPACE, open_objects: bool = False) -> None:
        self.root = root
        self.whitespace = whitespace
        self.open_objects = open_objects
        self._any: str | None = None
        self.subs: list[str] = []  # regexes outlines-core cannot build (or builds wrongly), by placeholder
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
            target = self._resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            merged = _merge(target, rest, path) if rest else target
            return self.walk(merged, path, refs + (ref,))
        if "allOf" in node:
            parts = node["allOf"]
            if not isinstance(parts, list) or not parts:
                raise GrammarError(f"json_schema: allOf at {path} must be a non-empty list")
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for i, part in enumerate(parts):  # merged as written (placeholders do not merge), then walked
                part, refs = self._deref(part, f"{path}/allOf/{i}", refs)
                merged = _merge(merged, part, f"{path}/allOf/{i}")
            return self.walk(merged, path, refs)
        if isinstance(node.get("oneOf"), list) and node["oneOf"]:
            exact = self.exclusive_one_of(node, path, refs)
            if exact is not None:
                return self.walk(exact, path, refs)
        for key in ("anyOf", "oneOf"):
            siblings = {k: v for k, v in node.items() if k != key and k not in _ANNOTATIONS and k not in ("$defs", "definitions")}
            if isinstance(node.get(key), list) and siblings:  # outlines-core reads the branches alone
                return self.walk(self._distribute(node, key, siblings, path, refs), path, refs)
        node = _drop_excluded(node, path)
        out: dict[str, Any] = {}
        for key, value in _declare_required(node, path).items():
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
            out = _filter_enum(out, path)  # the values decide the types (a branch per type might hold none)
            types = out.get("type")
        if isinstance(types, list):  # one branch per type, each with the keywords that apply to it
            if not types:
                raise GrammarError(f"json_schema: 'type' at {path} is an empty list")
            branches = [self.walk(_for_type(out, t), path, refs) for t in dict.fromkeys(types)]
            return branches[0] if len(branches) == 1 else {"anyOf": branches}
        if isinstance(types, str):  # keywords of the other types do not apply (outlines-core reads them anyway)
            out = _for_type(out, types)
        return self._check(out, path)

    def _distribute(self, node: dict[str, Any], key: str, siblings: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        """{siblings, anyOf: [A, B]} -> {anyOf: [siblings & A, siblings & B]}, dropping branches that
        conflict with the siblings (they admit nothing). For `oneOf` this is anyOf's reading: sound
        where the branches exclude one another, as outlines-core assumes for every oneOf."""
        branches = []
        for i, branch in enumerate(node[key]):
            branch, _ = self._deref(branch, f"{path}/{key}/{i}", refs)
            try:
                branches.append(_merge(siblings, branch, f"{path}/{key}/{i}"))
            except GrammarError:
                continue
        if not branches:
            raise GrammarError(f"json_schema: every {key} branch at {path} conflicts with the keywords beside it")
        keep = {k: v for k, v in node.items() if k in _ANNOTATIONS or k in ("$defs", "definitions")}
        return {**keep, key: branches}

    def exclusive_one_of(self, node: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any] | None:
        """`oneOf` read exactly, as an `anyOf` whose branches exclude one another, where that is
        provable: the branches (with the keywords beside them) already exclude one another (different
        types, or a required property with disjoint `const`/`enum` values), or they are objects that
        differ only in `required`. Then branch i holds and branch j fails exactly when some key that
        j requires beyond i's is absent: branch i becomes one alternative per choice of absent keys
        (`{"radius"}` vs `{"length", "width"}`: radius without length, or radius without width).
        None where it is not provable (the caller reads `oneOf` as `anyOf`)."""
        siblings = {k: v for k, v in node.items() if k != "oneOf" and k not in _ANNOTATIONS and k not in ("$defs", "definitions")}
        keep = {k: v for k, v in node.items() if k in _ANNOTATIONS or k in ("$defs", "definitions")}
        raw, merged = [], []
        for i, branch in enumerate(node["oneOf"]):
            try:
                branch, _ = self._deref(branch, f"{path}/oneOf/{i}", refs)
            except GrammarError:
                return None
            branch = {} if branch is True else branch
            if branch is False:
                continue  # never holds
            if not isinstance(branch, dict):
                return None
            try:
                merged.append(_merge(siblings, branch, f"{path}/oneOf/{i}"))
            except GrammarError:
                if _types(siblings) & _types(branch):
                    return None  # a conflict _merge cannot resolve (two patterns), not an empty branch
                continue  # of a type the keywords beside it exclude: never holds
            raw.append(branch)
        if not merged:
            return None
        if all(_disjoint(a, b) for i, a in enumerate(merged) for b in merged[i + 1 :]):
            return {**keep, "anyOf": merged}
        bare = [{k: v for k, v in b.items() if k != "required" and k not in _ANNOTATIONS} for b in raw]
        if any(b != bare[0] for b in bare) or any(m.get("type", "object") != "object" for m in merged):
            return None  # not provable here: anyOf's reading
        need = [set(m.get("required") or ()) for m in merged]
        out: list[dict[str, Any]] = []
        for i, m in enumerate(merged):
            extra = [need[j] - need[i] for j in range(len(merged)) if j != i]
            if any(not e for e in extra):
                continue  # another branch holds whenever this one does
            cuts: set[frozenset[str]] = set()
            _hitting_sets(extra, frozenset(), cuts)
            cuts = {c for c in cuts if not any(o < c for o in cuts)}
            if len(out) + len(cuts) > _MAX_ONE_OF_ALTERNATIVES:
                return None
            for cut in sorted(cuts, key=sorted):
                props = dict(m.get("properties") or {}) | {name: False for name in sorted(cut)}
                out.append({**m, "type": "object", "properties": props})
        if not out:
            raise GrammarError(f"json_schema: oneOf at {path} admits no value: each branch holds wherever another does")
        return {**keep, "anyOf": out}

    def _deref(self, node: Any, path: str, refs: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        """`node` with its top-level `$ref`s resolved (siblings merged in), and the refs followed."""
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise GrammarError(f"json_schema: recursive $ref {ref!r} at {path} is not supported yet")
            target = self._resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node, refs = (_merge(target, rest, path) if rest else target), refs + (ref,)
        return node, refs

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

    def _sub(self, regex: str) -> dict[str, Any]:
        self.subs.append(regex)
        return {"const": _PLACEHOLDER.format(len(self.subs) - 1)}

    def _check(self, node: dict[str, Any], path: str) -> dict[str, Any]:
        if isinstance(node.get("enum"), list) or "const" in node:
            node = _filter_enum(node, path)
            values = node["enum"] if "enum" in node else [node["const"]]
            if any(isinstance(v, (list, dict)) for v in values):
                # outlines-core spells an object's keys unescaped (JSON and regex alike): {"a\"b": 1}
                # came out as {"a"b": 1}, and a key holding `+` or `\d` matched other text.
                return self._sub("|".join(f"(?:{json_literal_regex(v, self.whitespace)})" for v in values))
        if not set(node) - _ANNOTATIONS:
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
        bounds = [k for k in _BOUNDS if k in node]
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
        rest = {k: v for k, v in node.items() if k not in _BOUNDS and k != "type"}
        if set(rest) & {"anyOf", "oneOf", "allOf", "enum", "const"}:
            raise GrammarError(f"json_schema: bounds at {path} cannot be combined with {sorted(set(rest) - _ANNOTATIONS)}")
        if node["type"] == "integer":
            lo, hi = _integer_bounds(node, path)
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
            other = f"{_other_key_regex([*node['properties'], *node.get(_FORBIDDEN, ())])}{ws}:{ws}{value}"
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
        return self._sub(f"\\{{{ws}{body}{ws}\\}}")

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
        body = _format_body(node["format"])
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


_ANY_ORDER_REQUIRED = 3  # up to 3 required members of an open object in any order (16 copies of each)
_ANY_ORDER_MAX_SIZE = 200_000  # ...while its regex, placeholders filled in, stays below this many characters
_FORBIDDEN = "x-loom-forbidden"  # properties that admit no value: never written, not even as undeclared ones
_ALL_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")


def _is_false(sub: Any) -> bool:
    """A schema no value satisfies: `false`, or `{"not": {}}` / `{"not": true}`."""
    if isinstance(sub, dict) and (isinstance(sub.get("enum"), list) or "const" in sub) and "$ref" not in sub:
        try:
            _filter_enum(sub, "#")
        except GrammarError:
            return True  # no listed value satisfies the keywords beside the list
    return sub is False or (isinstance(sub, dict) and sub.get("not", None) in ({}, True) and not set(sub) - _ANNOTATIONS - {"not"})


_MAX_ONE_OF_ALTERNATIVES = 32  # beyond, `oneOf` is read as `anyOf` (each alternative is a copy of the object)


def _hitting_sets(sets: list[set[str]], chosen: frozenset[str], out: set[frozenset[str]]) -> None:
    """Every set of keys that holds one key of each of `sets` (chosen among those not yet hit)."""
    if len(out) > _MAX_ONE_OF_ALTERNATIVES:
        return
    rest = [s for s in sets if not s & chosen]
    if not rest:
        out.add(chosen)
        return
    for key in sorted(rest[0]):
        _hitting_sets(rest[1:], chosen | {key}, out)


def _values(sub: Any) -> set[Any] | None:
    """The values a schema lists (`const` / `enum`), as comparable keys (1 == 1.0, true != 1); None
    when it lists none."""
    if not isinstance(sub, dict):
        return None
    key = lambda v: ("n", float(v)) if isinstance(v, (int, float)) and not isinstance(v, bool) else json.dumps(v, sort_keys=True)  # noqa: E731
    found = [{key(sub["const"])}] if "const" in sub else []
    if isinstance(sub.get("enum"), list):
        found.append({key(v) for v in sub["enum"]})
    return set.intersection(*found) if found else None


def _types(node: dict[str, Any]) -> set[str]:
    types = node.get("type", list(_ALL_TYPES))
    types = {types} if isinstance(types, str) else set(types)
    return types | {"integer"} if "number" in types else types


def _disjoint(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """No value satisfies both schemas, by their types or by a property both require with values
    listed apart."""
    if not _types(a) & _types(b):
        return True
    if _types(a) & _types(b) != {"object"}:
        return False  # a non-object satisfies both, whatever their object keywords
    both = set(a.get("required") or ()) & set(b.get("required") or ())
    for name in both:
        va, vb = _values((a.get("properties") or {}).get(name)), _values((b.get("properties") or {}).get(name))
        if va is not None and vb is not None and not va & vb:
            return True
    return False


def _drop_excluded(node: dict[str, Any], path: str) -> dict[str, Any]:
    """Rewrite the common `not`s: a property whose schema admits nothing cannot be present (dropped;
    refused if required), `additionalProperties: {"not": {}}` is `false`, and `not: {"type": T}`
    narrows `type`."""
    props = node.get("properties")
    if isinstance(props, dict) and any(_is_false(sub) for sub in props.values()):
        gone = [name for name, sub in props.items() if _is_false(sub)]
        required = [name for name in gone if name in (node.get("required") or ())]
        if required:
            raise GrammarError(f"json_schema: object at {path} admits no value: required {required[0]!r} admits no value")
        node = {**node, "properties": {k: v for k, v in props.items() if k not in gone}, _FORBIDDEN: gone}
    if "additionalProperties" in node and _is_false(node["additionalProperties"]):
        node = {**node, "additionalProperties": False}
    if node.get("properties") == {} and node.get("additionalProperties", True) is not False:
        node = {k: v for k, v in node.items() if k != "properties"}  # outlines-core: only {}; JSON Schema: any object
    neg = node.get("not")
    if isinstance(neg, dict) and set(neg) - _ANNOTATIONS == {"type"}:
        drop = {neg["type"]} if isinstance(neg["type"], str) else set(neg["type"])
        if "number" in drop:
            drop.add("integer")
        have = node.get("type", list(_ALL_TYPES))
        have = [have] if isinstance(have, str) else list(have)
        keep = [t for t in have if t not in drop]
        if not keep:
            raise GrammarError(f"json_schema: 'not' at {path} excludes every type")
        node = {k: v for k, v in node.items() if k != "not"} | {"type": keep if len(keep) > 1 else keep[0]}
    return node


def _filter_enum(node: dict[str, Any], path: str) -> dict[str, Any]:
    """`enum` / `const` beside other keywords: outlines-core emits the values and drops the rest
    (`{"enum": ["A"], "type": "object"}` gave "A"). Scalar values are checked against the other
    keywords here (the schema reduces to those that pass); arrays and objects are kept as they are."""
    import jsonschema

    values = node["enum"] if "enum" in node else [node["const"]]
    if "enum" in node and "const" in node:  # both (a merge): the const, if the enum lists it
        same = _values({"const": node["const"]})
        values = [v for v in values if _values({"const": v}) == same]
        node = {k: v for k, v in node.items() if k != "const"} | {"enum": values}
    rest = {k: v for k, v in node.items() if k not in ("enum", "const") and k not in _ANNOTATIONS}
    if not values:
        raise GrammarError(f"json_schema: no 'enum' / 'const' value at {path} satisfies the keywords beside it ({sorted(rest)})")
    if not rest:
        return node
    scalar = lambda v: not isinstance(v, (list, dict))  # noqa: E731
    try:
        check = jsonschema.Draft202012Validator({k: v for k, v in rest.items() if k not in ("properties", "items", "additionalProperties")})
        keep = [v for v in values if not scalar(v) or check.is_valid(v)]
    except jsonschema.exceptions.SchemaError:
        return node
    if not keep:
        raise GrammarError(f"json_schema: no 'enum' / 'const' value at {path} satisfies the keywords beside it ({sorted(rest)})")
    if all(scalar(v) for v in keep):
        return {k: v for k, v in node.items() if k in _ANNOTATIONS} | {"enum": keep}
    return {**node, "enum": keep} if "enum" in node else node


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


def _declare_required(node: dict[str, Any], path: str) -> dict[str, Any]:
    """outlines-core only emits required names that `properties` declares (an undeclared one is
    silently optional): declare each, as `additionalProperties` would constrain it."""
    required = node.get("required")
    if not isinstance(required, list) or node.get("type", "object") != "object":
        return node
    props = node.get("properties") or {}
    missing = [name for name in required if name not in props]
    if not missing:
        return node
    extra = node.get("additionalProperties", True)
    if extra is False:
        raise GrammarError(
            f"json_schema: object at {path} admits no value: required {missing[0]!r} is not among its properties "
            "and 'additionalProperties' is false"
        )
    return {**node, "properties": {**props, **{name: extra if isinstance(extra, dict) else {} for name in missing}}}


_TYPE_KEYWORDS = {
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "string": {"minLength", "maxLength", "pattern", "format"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties", "maxProperties"},
}
_TYPED = set().union(*_TYPE_KEYWORDS.values())


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


_KEY_CHAR = '[^"\\\\\\x00-\\x1f]'  # a key character written as itself (other keys are spelled without escapes)


def _other_key_regex(names: list[str]) -> str:
    """A quoted JSON key, written without escapes, equal to none of `names`: the complement of
    their trie."""
    trie: dict[str, Any] = {}
    for name in names:
        if all(re.fullmatch(_KEY_CHAR, ch) for ch in name):  # a name needing escapes never collides
            node = trie
            for ch in name:
                node = node.setdefault(ch, {})
            node[""] = {}

    def rest(node: dict[str, Any]) -> str:
        kids = [ch for ch in node if ch]
        alts = [] if "" in node else [""]  # stop here: this prefix is no name
        if kids:
            not_kid = "".join("\\" + ch if ch in "\\]^-[" else ch for ch in kids)
            alts.append(_KEY_CHAR[:-1] + not_kid + "]" + _KEY_CHAR + "*")
        else:
            alts.append(_KEY_CHAR + "+")
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


def _format_body(fmt: Any) -> str | None:
    if not isinstance(fmt, str):
        return None
    if fmt in _STRICT_FORMATS:
        return _STRICT_FORMATS[fmt]
    if fmt not in _FORMAT_BODIES:
        try:
            quoted = build_regex_from_schema(json.dumps({"type": "string", "format": fmt}))
            body = json_string_body("(?a)^(?:" + quoted[1:-1] + ")$", f"format {fmt!r}")
        except (ValueError, TypeError, GrammarError):
            body = None
        _FORMAT_BODIES[fmt] = body
    return _FORMAT_BODIES[fmt]


def number_range_regex(node: dict[str, Any], path: str) -> str:
    """Plain decimal numbers (no exponent) within a `number` schema's bounds, when those are integers."""
    import math

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


def _merge(a: Any, b: Any, path: str) -> Any:
    """allOf / $ref-with-siblings: one schema that requires both.

    `additionalProperties` only sees its own schema's `properties` (JSON Schema's rule), so a
    closed part excludes the other part's extra properties rather than adopting them: a property
    survives the merge only if every part admits it (declared, or through an open or schema-valued
    `additionalProperties`, which then constrains it too)."""
    if a is True or b is False:
        return b
    if b is True or a is False:
        return a
    if not isinstance(a, dict) or not isinstance(b, dict):
        raise GrammarError(f"json_schema: cannot merge non-object schemas at {path}")
    out = dict(a)
    for key, value in b.items():
        if key in ("properties", "additionalProperties"):
            continue  # below, together
        if key not in out:
            out[key] = value
        elif key in ("required", "allOf"):
            out[key] = list(dict.fromkeys(list(out[key]) + list(value))) if key == "required" else [*out[key], *value]
        elif key in ("minimum", "exclusiveMinimum", "minLength", "minItems"):
            out[key] = max(out[key], value)
        elif key in ("maximum", "exclusiveMaximum", "maxLength", "maxItems"):
            out[key] = min(out[key], value)
        elif key == "items" and isinstance(out[key], (dict, bool)) and isinstance(value, (dict, bool)):
            out[key] = _merge(out[key], value, f"{path}/items")
        elif out[key] != value and key not in ("description", "title", "$comment", "examples", "default"):
            raise GrammarError(f"json_schema: allOf at {path} has conflicting {key!r} ({out[key]!r} vs {value!r})")
    if any(k in s for s in (a, b) for k in ("properties", "additionalProperties")):
        props, extra = _merge_properties(a, b, set(out.get("required", ())), path)
        out["properties"] = props
        if extra is None:
            out.pop("additionalProperties", None)
        else:
            out["additionalProperties"] = extra
    return out


def _merge_properties(a: dict[str, Any], b: dict[str, Any], required: set[str], path: str) -> tuple[dict[str, Any], Any]:
    """(properties, additionalProperties or None for absent) of the object both `a` and `b` admit."""
    parts = [(s.get("properties") or {}, s.get("additionalProperties", None)) for s in (a, b)]
    props: dict[str, Any] = {}
    for name in dict.fromkeys([*parts[0][0], *parts[1][0]]):
        subs: list[Any] | None = []
        for declared, extra in parts:
            if name in declared:
                subs.append(declared[name])
            elif extra is False:
                subs = None  # this part is closed and does not declare it
                break
            elif isinstance(extra, dict):
                subs.append(extra)
        if subs is None:
            if name in required:
                raise GrammarError(
                    f"json_schema: allOf at {path} admits no object: {name!r} is required, but a part with "
                    "'additionalProperties': false does not declare it"
                )
            continue
        merged: Any = True
        for sub in subs:
            merged = _merge(merged, sub, f"{path}/properties/{name}")
        props[name] = merged
    extras = [x for _, x in parts if x is not None]
    if any(x is False for x in extras):
        return props, False
    schemas = [x for x in extras if isinstance(x, dict)]
    if schemas:
        return props, schemas[0] if len(schemas) == 1 else _merge(schemas[0], schemas[1], f"{path}/additionalProperties")
    return props, (True if extras else None)


# ----------------------------------------------------------------------------- string patterns

_SHORT_ESCAPES = {0x08: "b", 0x09: "t", 0x0A: "n", 0x0C: "f", 0x0D: "r"}
_MUST_ESCAPE: Ranges = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]  # control characters, '"', '\\'


def json_string_body(pattern: str, where: str) -> str:
    """A regex over the JSON text between a string's quotes whose decoded value `re.search`es
    `pattern` (Python's regex semantics, as `jsonschema` checks it): every character the pattern
    admits is spelled the way JSON allows, control characters as `\\n` / `\\u000a`, `"` as `\\"`.
    Unanchored ends admit any characters. Raises GrammarError naming `where` for invalid patterns
    and constructs with no automaton (look-arounds, back-references, inner anchors)."""
    try:
        parsed = _p.parse(pattern, 0)
    except re.error as e:
        raise GrammarError(f"json_schema: {where} is not a valid regex: {e}") from None
    flags = parsed.state.flags
    items = list(parsed.data)
    branches = [items]
    if len(items) == 1 and items[0][0] is _c.BRANCH:  # ^a|b$: anchors per alternative
        branches = [list(alt.data) for alt in items[0][1][1]]
    anything = f"(?:{_json_chars(list(_ALL))})*"
    out = []
    for branch in branches:
        head = bool(branch) and branch[0] == (_c.AT, _c.AT_BEGINNING) or branch[:1] == [(_c.AT, _c.AT_BEGINNING_STRING)]
        tail = bool(branch) and branch[-1][0] is _c.AT and branch[-1][1] in (_c.AT_END, _c.AT_END_STRING)
        body = branch[int(head) : len(branch) - int(tail) if tail else None]
        out.append(("" if head else anything) + _emit(body, flags, where) + ("" if tail else anything))
    return out[0] if len(out) == 1 else "(?:" + "|".join(out) + ")"


def _emit(items: list, flags: int, where: str) -> str:
    return "".join(_emit_one(op, av, flags, where) for op, av in items)


def _emit_one(op: Any, av: Any, flags: int, where: str) -> str:
    if op in (_c.LITERAL, _c.NOT_LITERAL, _c.IN, _c.ANY):
        return _json_chars(_charset(op, av, flags, where))
    if op is _c.SUBPATTERN:
        _group, add, remove, sub = av
        return "(?:" + _emit(list(sub.data), (flags | add) & ~remove, where) + ")"
    if op is _c.BRANCH:
        return "(?:" + "|".join(_emit(list(alt.data), flags, where) for alt in av[1]) + ")"
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", _c.MAX_REPEAT)):
        lo, hi, sub = av
        bound = f"{{{lo},}}" if hi is _c.MAXREPEAT else f"{{{lo},{hi}}}"
        return "(?:" + _emit(list(sub.data), flags, where) + ")" + bound
    names = {_c.AT: "an anchor (^, $, \\b) inside the pattern", _c.ASSERT: "a look-around", _c.ASSERT_NOT: "a look-around",
             _c.GROUPREF: "a back-reference"}  # fmt: skip
    raise GrammarError(f"json_schema: {where} uses {names.get(op, str(op))}, which this backend cannot enforce")


def _charset(op: Any, av: Any, flags: int, where: str) -> Ranges:
    """The code points one pattern atom admits (as ebnf_automaton reads them)."""
    if op is _c.ANY:
        return list(_ALL) if flags & re.DOTALL else _complement([(10, 10)])
    if op is _c.IN:
        items = list(av)
        negate = bool(items) and items[0][0] is _c.NEGATE
        try:
            ranges = _normalise([r for o, a in items[negate:] for r in _set_of(o, a, flags, where)])
        except GrammarError:
            raise GrammarError(f"json_schema: {where} has a character class this backend cannot read") from None
    else:
        ranges, negate = [(av, av)], op is _c.NOT_LITERAL
    if flags & re.IGNORECASE:
        ranges = _case_variants(ranges)
    return _complement(ranges) if negate else _intersect_all(ranges)


def _json_chars(ranges: Ranges) -> str:
    """One character from `ranges` as JSON text: a raw character, or an escape for those JSON
    requires escaped (short escapes where JSON has them, and \\u00XX either way)."""
    plain = _intersect_all(_complement(_complement(ranges) + _MUST_ESCAPE))  # ranges minus the must-escape set
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
