"""JSON Schema rewrites both schema compilers share (schema.py's regex path, schema_grammar.py's
grammar path), on one root schema:

- local `$ref`s (`#/$defs/...`, `#/definitions/...`) resolved (SchemaNormaliser.resolve / deref);
- `allOf` merged into one schema (merge_schemas);
- `anyOf` / `oneOf` beside other keywords distributed into the branches (distribute), and `oneOf`
  read exactly where its branches can be proven to exclude one another (exclusive_one_of);
- `enum` / `const` filtered by the keywords beside them (filter_enum), required names declared
  (declare_required), properties admitting nothing dropped (drop_excluded), keywords of other
  types dropped (for_type), integer bounds read (integer_bounds).

Each raises GrammarError naming the keyword and its path where the schema admits no value there
or cannot be read.
"""

from __future__ import annotations

import json
import math
from typing import Any

from loom.runtime.constrained.errors import ErrorKind, GrammarError

BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
ANNOTATIONS = {"description", "title", "default", "examples", "$comment", "$schema", "$id", "id", "deprecated",
               "readOnly", "writeOnly", "x-loom-forbidden"}  # fmt: skip
FORBIDDEN = "x-loom-forbidden"  # properties that admit no value: never written, not even as undeclared ones
_ALL_TYPES = ("string", "number", "integer", "boolean", "null", "array", "object")
MAX_ONE_OF_ALTERNATIVES = 32  # beyond, `oneOf` is read as `anyOf` (each alternative is a copy of the object)


def parse_schema(source: str) -> Any:
    """A JSON Schema as a JSON string -> the schema (`true` read as `{}`, any JSON value). Raises
    GrammarError of kind MALFORMED when it is not JSON, of kind EMPTY when it is `false`."""
    try:
        schema = json.loads(source)
    except json.JSONDecodeError as e:
        raise GrammarError(f"json_schema is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}", ErrorKind.MALFORMED) from None
    if schema is True:
        return {}  # any JSON value
    if schema is False:
        raise GrammarError("json_schema false admits no value", ErrorKind.EMPTY)
    return schema


class SchemaNormaliser:
    """$ref resolution and the rewrites of `anyOf` / `oneOf`, against one root schema. `path` names
    where a node sits (for messages); `refs` are the $refs followed to reach it (recursion guard)."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def distribute(self, node: dict[str, Any], key: str, siblings: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any]:
        """{siblings, anyOf: [A, B]} -> {anyOf: [siblings & A, siblings & B]}, dropping branches that
        conflict with the siblings (they admit nothing). For `oneOf` this is anyOf's reading: sound
        where the branches exclude one another, as outlines-core assumes for every oneOf."""
        branches = []
        for i, branch in enumerate(node[key]):
            branch, _ = self.deref(branch, f"{path}/{key}/{i}", refs)
            try:
                branches.append(merge_schemas(siblings, branch, f"{path}/{key}/{i}"))
            except GrammarError:
                continue
        if not branches:
            raise GrammarError(f"json_schema: every {key} branch at {path} conflicts with the keywords beside it")
        keep = {k: v for k, v in node.items() if k in ANNOTATIONS or k in ("$defs", "definitions")}
        return {**keep, key: branches}

    def exclusive_one_of(self, node: dict[str, Any], path: str, refs: tuple[str, ...]) -> dict[str, Any] | None:
        """`oneOf` read exactly, as an `anyOf` whose branches exclude one another, where that is
        provable: the branches (with the keywords beside them) already exclude one another (different
        types, or a required property with disjoint `const`/`enum` values), or they are objects that
        differ only in `required`. Then branch i holds and branch j fails exactly when some key that
        j requires beyond i's is absent: branch i becomes one alternative per choice of absent keys
        (`{"radius"}` vs `{"length", "width"}`: radius without length, or radius without width).
        None where it is not provable (the caller reads `oneOf` as `anyOf`)."""
        siblings = {k: v for k, v in node.items() if k != "oneOf" and k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        keep = {k: v for k, v in node.items() if k in ANNOTATIONS or k in ("$defs", "definitions")}
        raw, merged = [], []
        for i, branch in enumerate(node["oneOf"]):
            try:
                branch, _ = self.deref(branch, f"{path}/oneOf/{i}", refs)
            except GrammarError:
                return None
            branch = {} if branch is True else branch
            if branch is False:
                continue  # never holds
            if not isinstance(branch, dict):
                return None
            try:
                merged.append(merge_schemas(siblings, branch, f"{path}/oneOf/{i}"))
            except GrammarError:
                if _types(siblings) & _types(branch):
                    return None  # a conflict merge_schemas cannot resolve (two patterns), not an empty branch
                continue  # of a type the keywords beside it exclude: never holds
            raw.append(branch)
        if not merged:
            return None
        if all(_disjoint(a, b) for i, a in enumerate(merged) for b in merged[i + 1 :]):
            return {**keep, "anyOf": merged}
        bare = [{k: v for k, v in b.items() if k != "required" and k not in ANNOTATIONS} for b in raw]
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
            if len(out) + len(cuts) > MAX_ONE_OF_ALTERNATIVES:
                return None
            for cut in sorted(cuts, key=sorted):
                props = dict(m.get("properties") or {}) | {name: False for name in sorted(cut)}
                out.append({**m, "type": "object", "properties": props})
        if not out:
            raise GrammarError(f"json_schema: oneOf at {path} admits no value: each branch holds wherever another does")
        return {**keep, "anyOf": out}

    def deref(self, node: Any, path: str, refs: tuple[str, ...]) -> tuple[Any, tuple[str, ...]]:
        """`node` with its top-level `$ref`s resolved (siblings merged in), and the refs followed."""
        while isinstance(node, dict) and "$ref" in node:
            ref = node["$ref"]
            if ref in refs:
                raise GrammarError(f"json_schema: recursive $ref {ref!r} at {path} is not supported yet")
            target = self.resolve(ref, path)
            rest = {k: v for k, v in node.items() if k != "$ref"}
            node, refs = (merge_schemas(target, rest, path) if rest else target), refs + (ref,)
        return node, refs

    def resolve(self, ref: Any, path: str) -> Any:
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


def _is_false(sub: Any) -> bool:
    """A schema no value satisfies: `false`, or `{"not": {}}` / `{"not": true}`."""
    if isinstance(sub, dict) and (isinstance(sub.get("enum"), list) or "const" in sub) and "$ref" not in sub:
        try:
            filter_enum(sub, "#")
        except GrammarError:
            return True  # no listed value satisfies the keywords beside the list
    return sub is False or (isinstance(sub, dict) and sub.get("not", None) in ({}, True) and not set(sub) - ANNOTATIONS - {"not"})


def _hitting_sets(sets: list[set[str]], chosen: frozenset[str], out: set[frozenset[str]]) -> None:
    """Every set of keys that holds one key of each of `sets` (chosen among those not yet hit)."""
    if len(out) > MAX_ONE_OF_ALTERNATIVES:
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


def drop_excluded(node: dict[str, Any], path: str) -> dict[str, Any]:
    """Rewrite the common `not`s: a property whose schema admits nothing cannot be present (dropped;
    refused if required), `additionalProperties: {"not": {}}` is `false`, and `not: {"type": T}`
    narrows `type`."""
    props = node.get("properties")
    if isinstance(props, dict) and any(_is_false(sub) for sub in props.values()):
        gone = [name for name, sub in props.items() if _is_false(sub)]
        required = [name for name in gone if name in (node.get("required") or ())]
        if required:
            raise GrammarError(f"json_schema: object at {path} admits no value: required {required[0]!r} admits no value")
        node = {**node, "properties": {k: v for k, v in props.items() if k not in gone}, FORBIDDEN: gone}
    if "additionalProperties" in node and _is_false(node["additionalProperties"]):
        node = {**node, "additionalProperties": False}
    if node.get("properties") == {} and node.get("additionalProperties", True) is not False:
        node = {k: v for k, v in node.items() if k != "properties"}  # outlines-core: only {}; JSON Schema: any object
    neg = node.get("not")
    if isinstance(neg, dict) and set(neg) - ANNOTATIONS == {"type"}:
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


def filter_enum(node: dict[str, Any], path: str) -> dict[str, Any]:
    """`enum` / `const` beside other keywords: outlines-core emits the values and drops the rest
    (`{"enum": ["A"], "type": "object"}` gave "A"). Scalar values are checked against the other
    keywords here (the schema reduces to those that pass); arrays and objects are kept as they are."""
    import jsonschema

    values = node["enum"] if "enum" in node else [node["const"]]
    if "enum" in node and "const" in node:  # both (a merge): the const, if the enum lists it
        same = _values({"const": node["const"]})
        values = [v for v in values if _values({"const": v}) == same]
        node = {k: v for k, v in node.items() if k != "const"} | {"enum": values}
    rest = {k: v for k, v in node.items() if k not in ("enum", "const") and k not in ANNOTATIONS}
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
        return {k: v for k, v in node.items() if k in ANNOTATIONS} | {"enum": keep}
    return {**node, "enum": keep} if "enum" in node else node


def declare_required(node: dict[str, Any], path: str) -> dict[str, Any]:
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


def for_type(node: dict[str, Any], type_name: Any) -> dict[str, Any]:
    """`node` with a single `type`, keeping only the keywords that constrain that type."""
    if type_name not in _TYPE_KEYWORDS and type_name not in ("boolean", "null"):
        raise GrammarError(f"json_schema: unknown type {type_name!r}")
    keep = _TYPE_KEYWORDS.get(type_name, set())
    return {**{k: v for k, v in node.items() if k not in _TYPED or k in keep}, "type": type_name}


def integer_bounds(node: dict[str, Any], path: str) -> tuple[int | None, int | None]:
    """The integers an `integer` schema's bounds admit, as [lo, hi] (None: unbounded)."""
    lo = hi = None
    for key in BOUNDS:
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


def merge_schemas(a: Any, b: Any, path: str) -> Any:
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
            out[key] = merge_schemas(out[key], value, f"{path}/items")
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
            merged = merge_schemas(merged, sub, f"{path}/properties/{name}")
        props[name] = merged
    extras = [x for _, x in parts if x is not None]
    if any(x is False for x in extras):
        return props, False
    schemas = [x for x in extras if isinstance(x, dict)]
    if schemas:
        return props, schemas[0] if len(schemas) == 1 else merge_schemas(schemas[0], schemas[1], f"{path}/additionalProperties")
    return props, (True if extras else None)
