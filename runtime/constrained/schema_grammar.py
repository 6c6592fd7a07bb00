"""JSON Schema -> a Lark grammar for the EBNF engine (ebnf.py), for schemas the regex path refuses.

    schema_to_grammar(source, whitespace_pattern, open_objects) -> (Lark source, terminal automata)
    compile_grammar("lark", source, vocab, terminal_dfas=automata) -> CompiledEbnf

The regex path (schema.py -> regex_dfa.py) builds one automaton for the whole schema: recursive
`$ref`s have none, and large objects with many optional or undeclared properties outgrow it.
Here objects, arrays and alternatives are grammar RULES (a `$ref` is a rule, so recursion is a
recursive rule; an object of n properties is O(n) rules) and leaves (strings with their
pattern / length / format, numbers and integer ranges, enums and consts, keys) are TERMINALS.

The EBNF engine lexes nondeterministically (overlapping terminals are all tried), so every
object and array rule gets its own opening-bracket terminal: alternatives (`anyOf`, a list of
types) then parse side by side instead of making LALR(1) conflicts, and the grammar stays
conflict-free by construction (members in declared order, each identified by its key terminal).

The schema rewrites are schema_normaliser.py's (`$ref`s, `allOf` merging, `anyOf` beside other
keywords, required names, `enum` filtering), the leaves' regexes json_regex.py's (integer / number
ranges, string patterns and formats as JSON text, keys).
Anything that cannot be enforced is refused with a GrammarError naming the keyword.
"""

from __future__ import annotations

import json
import re
from typing import Any

from loom.runtime.constrained.dfa import ByteDFA, terminal_dfa, words_dfa
from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.json_regex import (
    DEFAULT_WHITESPACE,
    KEY_CHAR,
    format_body,
    integer_range_regex,
    json_literal_regex,
    json_string_body,
    number_range_regex,
    other_key_regex,
)
from loom.runtime.constrained.regex_syntax import sre_parse
from loom.runtime.constrained.schema_automata import STRING_CHAR, counted_string_dfa
from loom.runtime.constrained.schema_automata import empty as _empty
from loom.runtime.constrained.schema_automata import product as _product
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

_STRING_CHAR = STRING_CHAR
_STRING = f'"{_STRING_CHAR}*"'
_INT = r"-?(?:0|[1-9][0-9]*)"
_NUM = _INT + r"(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?"
_SCALAR = f"{_STRING}|{_NUM}|true|false|null"
# A counted string length up to this is one terminal (its automaton has a few states per counted
# character); beyond, the string is split into chunk terminals counted by rules.
MAX_TERMINAL_LENGTH = 64
MAX_PRODUCT_LENGTH = 256  # a pattern or format beside minLength / maxLength up to this: product automaton
MAX_COUNTED_ITEMS = 1000  # minItems / maxItems expanded into rules up to this
_REFUSED = ("multipleOf", "not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
            "contains", "minContains", "maxContains", "unevaluatedProperties", "unevaluatedItems", "propertyNames",
            "minProperties", "maxProperties", "$dynamicRef", "$recursiveRef")  # fmt: skip
_ANY_ORDER_REQUIRED = 4  # an open object's required members in any order: a rule per subset of them
_OBJECT_KEYS = ("properties", "additionalProperties", "required", "patternProperties")
_ARRAY_KEYS = ("items", "prefixItems", "minItems", "maxItems", "additionalItems")
_STRING_KEYS = ("pattern", "minLength", "maxLength", "format")
_NUMBER_KEYS = BOUNDS


def schema_to_grammar(source: str, whitespace_pattern: str = DEFAULT_WHITESPACE, open_objects: bool = False) -> tuple[str, dict[str, ByteDFA]]:
    """A JSON Schema (as a JSON string) -> (Lark source, every terminal's automaton) for
    compile_grammar("lark", source, vocab, terminal_dfas=...), whose language validates against the
    schema (objects closed or open as schema_to_regex has them). Raises GrammarError naming the
    keyword or problem for schemas it cannot enforce.

    The Lark source names each terminal by a placeholder string: Lark evaluates the escapes of a
    /regex/ literal (a `\\U0000005d` becomes a raw `]`), and some terminals have no regex at all
    (keys matching no `patternProperties` pattern: complements of automata)."""
    schema = parse_schema(source)
    b = _Builder(schema, whitespace_pattern, open_objects)
    top = b.sym(schema, "#", ())
    return b.source(top), b.dfas


_SAFE_ESCAPE = r'\\["\\bfnrt]'  # decodes to '"', '\\' or a control character


def _other_key(builder: Any, names: list[str]) -> str:
    """A quoted key differing from every name in `names`: written without escapes (the complement
    of their trie), or with at least one escape decoding to a quote, backslash or control character
    where no name holds one (such a key is no name, however the rest is spelled)."""
    plain = other_key_regex(names)
    if any(re.search(r'["\\\x00-\x1f]', n) for n in names):
        return plain
    char = f"(?:{KEY_CHAR}|{_SAFE_ESCAPE})"
    return f'(?:{plain}|"{char}*{_SAFE_ESCAPE}{char}*")'


class _Builder:
    def __init__(self, root: Any, ws: str, open_objects: bool) -> None:
        self.root = root
        self.ws = ws
        self.open_objects = open_objects
        self.norm = SchemaNormaliser(root)  # for $ref resolution and anyOf distribution
        self.rules: dict[str, str] = {}  # rule name -> body ("" for the empty rule)
        self.terminals: dict[str, str] = {}  # terminal name -> regex
        self._term_of: dict[str, str] = {}  # regex -> shared terminal name
        self._pattern_keys: dict[tuple[tuple[str, ...], tuple[str, ...], bool], tuple] = {}  # see _pattern_keys_of
        self._by_ref: dict[str, str] = {}
        self._by_key: dict[str, str] = {}
        self._any: str | None = None
        self._n = 0
        self.dfas: dict[str, ByteDFA] = {}  # terminal name -> its automaton, where no regex spells it

    # ------------------------------------------------------------------ symbols
    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}{self._n}"

    def term(self, regex: str, hint: str = "T", unique: bool = False) -> str:
        if not unique and regex in self._term_of:
            return self._term_of[regex]
        name = self._name(hint.upper())
        self.terminals[name] = regex
        if not unique:
            self._term_of[regex] = name
        return name

    def rule(self, body: str, hint: str = "r") -> str:
        name = self._name(hint.lower())
        self.rules[name] = body
        return name

    def source(self, top: str) -> str:
        lines = [f"start: {top}"]
        lines += [f"{name}: {body}" if body else f"{name}: " for name, body in self.rules.items()]
        lines += [f'{name}: "{name.lower()}"' for name in self.terminals]
        for name, regex in self.terminals.items():
            if name not in self.dfas:
                self.dfas[name] = terminal_dfa(regex, "json_schema grammar terminal")
        return "\n".join(lines) + "\n"

    @property
    def lbrace(self) -> str:
        return f"\\{{{self.ws}"

    def comma(self) -> str:
        return self.term(f"{self.ws},{self.ws}", "COMMA")

    def key(self, regex: str) -> str:
        return self.term(f"{regex}{self.ws}:{self.ws}", "KEY")

    def any_value(self) -> str:
        """Any JSON value, nested to any depth."""
        if self._any is None:
            self._any = name = self._name("any")
            self.rules[name] = ""  # reserved (recursive)
            scalar = self.term(_SCALAR, "SCALAR")
            comma, key = self.comma(), self.key(_STRING)
            obj = self.rule(f"{self.term(self.lbrace, 'LBRACE', True)} ({key} {name} ({comma} {key} {name})*)? {self.term(self.ws + chr(92) + '}', 'RBRACE')}", "anyobj")
            arr = self.rule(f"{self.term(chr(92) + '[' + self.ws, 'LBRACK', True)} ({name} ({comma} {name})*)? {self.term(self.ws + chr(92) + ']', 'RBRACK')}", "anyarr")
            self.rules[name] = f"{scalar} | {obj} | {arr}"
        return self._any

    def sym(self, node: Any, path: str, refs: tuple[str, ...]) -> str:
        """The grammar symbol (rule or terminal) of a subschema."""
        if node is True:
            return self.any_value()
        if node is False:
            raise GrammarError(f"json_schema: the schema at {path} is false and admits no value")
        if not isinstance(node, dict):
            raise GrammarError(f"json_schema: expected a schema object at {path}, got {node!r}")
        node = {k: v for k, v in node.items() if k not in ANNOTATIONS and k not in ("$defs", "definitions")}
        if not node:
            return self.any_value()
        if set(node) == {"$ref"}:
            ref = node["$ref"]
            hit = self._by_ref.get(ref)
            if hit is None:
                hit = self._by_ref[ref] = self._name("ref")
                self.rules[hit] = ""  # reserved: a recursive reference names it before it is built
                self.rules[hit] = self.sym(self.norm.resolve(ref, path), str(ref), ())
            return hit
        try:
            key = json.dumps(node, sort_keys=True)
        except (TypeError, ValueError):
            key = None
        if key is not None and key in self._by_key:
            return self._by_key[key]
        out = self._build(node, path, refs)
        if key is not None:
            self._by_key[key] = out
        return out

    def alternatives(self, syms: list[str], hint: str = "alt") -> str:
        syms = list(dict.fromkeys(syms))
        if len(syms) == 1:
            return syms[0]
        if all(s in self.terminals and s not in self.dfas for s in syms):  # (not those with automata of their own)  # leaves: one terminal (one lexer configuration, not n)
            return self.term("|".join(f"(?:{self.terminals[s]})" for s in syms), "LEAF")
        return self.rule(" | ".join(syms), hint)

    # ------------------------------------------------------------------ schemas
    def _build(self, node: dict[str, Any], path: str, refs: tuple[str, ...]) -> str:
        if "$ref" in node:  # beside other keywords: merged into the target
            ref = node["$ref"]
            if ref in refs:
                raise GrammarError(f"json_schema: recursive $ref {ref!r} at {path} with keywords beside it cannot be enforced")
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return self.sym(merge_schemas(self.norm.resolve(ref, path), rest, path), path, refs + (ref,))
        if "allOf" in node:
            parts = node["allOf"]
            if not isinstance(parts, list) or not parts:
                raise GrammarError(f"json_schema: allOf at {path} must be a non-empty list")
            merged = {k: v for k, v in node.items() if k != "allOf"}
            for i, part in enumerate(parts):
                part, refs = self.norm.deref(part, f"{path}/allOf/{i}", refs)
                merged = merge_schemas(merged, part, f"{path}/allOf/{i}")
            return self.sym(merged, path, refs)
        if isinstance(node.get("oneOf"), list) and node["oneOf"]:
            exact = self.norm.exclusive_one_of(node, path, refs)
            if exact is not None:
                return self.sym(exact, path, refs)
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list):
                siblings = {k: v for k, v in node.items() if k != key}
                if siblings:
                    return self.sym(self.norm.distribute(node, key, siblings, path, refs), path, refs)
                if not node[key]:
                    raise GrammarError(f"json_schema: {key} at {path} is empty")
                return self.alternatives([self.sym(b, f"{path}/{key}/{i}", refs) for i, b in enumerate(node[key])], key.lower())
        node = drop_excluded(node, path)
        node = declare_required(node, path)
        for bound in ("Minimum", "Maximum"):  # draft 4: "exclusiveMinimum": true qualifies "minimum"
            flag = node.get(f"exclusive{bound}")
            if isinstance(flag, bool):
                node = {k: v for k, v in node.items() if k != f"exclusive{bound}"}
                if flag and bound.lower() in node:
                    node[f"exclusive{bound}"] = node.pop(bound.lower())
        types = node.get("type")
        if isinstance(types, list) and (isinstance(node.get("enum"), list) or "const" in node):
            node = filter_enum(node, path)
            types = node.get("type")
        if isinstance(types, list):
            if not types:
                raise GrammarError(f"json_schema: 'type' at {path} is an empty list")
            return self.alternatives([self.sym(for_type(node, t), path, refs) for t in dict.fromkeys(types)], "types")
        if isinstance(types, str):
            node = for_type(node, types)
        if isinstance(node.get("enum"), list) or "const" in node:
            node = filter_enum(node, path)
            values = node["enum"] if "enum" in node else [node["const"]]
            if not values:
                raise GrammarError(f"json_schema: 'enum' at {path} is empty")
            rest = {k: v for k, v in node.items() if k not in ("enum", "const", "type") and k not in ANNOTATIONS}
            if rest:  # _filter_enum keeps arrays and objects unchecked: check them against the rest here
                values = self._valid_values(values, {**rest, **({"type": node["type"]} if "type" in node else {})}, path)
            return self.term("|".join(f"(?:{json_literal_regex(v, self.ws)})" for v in values), "ENUM")
        for key in _REFUSED:
            if key in node and not (key == "multipleOf" and node[key] == 1 and node.get("type") == "integer"):
                raise GrammarError(f"json_schema: keyword {key!r} at {path} cannot be enforced by this backend")
        if node.get("uniqueItems") is True:
            raise GrammarError(f"json_schema: keyword 'uniqueItems' at {path} cannot be enforced by this backend")
        t = node.get("type")
        if t is None:
            if any(k in node for k in _OBJECT_KEYS):
                t = "object"
            elif any(k in node for k in _ARRAY_KEYS):
                t = "array"
            elif any(k in node for k in _STRING_KEYS):
                t = "string"
            elif any(k in node for k in _NUMBER_KEYS):
                t = "number"
            else:
                return self.any_value()
        if t == "object":
            return self._object(node, path, refs)
        if t == "array":
            return self._array(node, path, refs)
        if t == "string":
            return self._string(node, path)
        if t == "integer":
            lo, hi = integer_bounds(node, path)
            return self.term(integer_range_regex(lo, hi) if (lo, hi) != (None, None) else _INT, "INT")
        if t == "number":
            return self.term(number_range_regex(node, path) if any(k in node for k in BOUNDS) else _NUM, "NUM")
        if t == "boolean":
            return self.term("true|false", "BOOL")
        if t == "null":
            return self.term("null", "NULL")
        raise GrammarError(f"json_schema: unknown type {t!r} at {path}")

    def _valid_values(self, values: list[Any], rest: dict[str, Any], path: str) -> list[Any]:
        import jsonschema

        schema = {**rest}
        for key in ("$defs", "definitions"):
            if isinstance(self.root, dict) and key in self.root:
                schema[key] = self.root[key]
        try:
            check = jsonschema.Draft202012Validator(schema)
            keep = [v for v in values if check.is_valid(v)]
        except Exception:  # noqa: BLE001 - unresolvable references, invalid keywords
            raise GrammarError(f"json_schema: 'enum' / 'const' at {path} beside {sorted(rest)} cannot be enforced by this backend") from None
        if not keep:
            raise GrammarError(f"json_schema: no 'enum' / 'const' value at {path} satisfies the keywords beside it ({sorted(rest)})")
        return keep

    def _string(self, node: dict[str, Any], path: str) -> str:
        lo = node.get("minLength", 0)
        hi = node.get("maxLength")
        for k, v in (("minLength", lo), ("maxLength", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise GrammarError(f"json_schema: {k} at {path} must be a non-negative integer, got {v!r}")
        if hi is not None and hi < lo:
            raise GrammarError(f"json_schema: string at {path} admits no value (minLength {lo} > maxLength {hi})")
        if "pattern" in node:
            body = json_string_body(node["pattern"], f"'pattern' at {path}")
            return self._bounded(body, lo, hi, "'pattern'", path)
        if "format" in node:
            body = format_body(node["format"])
            if body is not None:
                return self._bounded(body, lo, hi, f"'format' {node['format']!r}", path)
        if not lo and hi is None:
            return self.term(_STRING, "STRING")
        if (hi if hi is not None else lo) <= MAX_TERMINAL_LENGTH:
            return self._counted(lo, hi, True, True, "STRLEN")
        return self._long_string(lo, hi)

    def _counted(self, lo: int, hi: int | None, open_quote: bool, close_quote: bool, hint: str) -> str:
        """The terminal of lo..hi string characters (quotes as asked), its automaton built directly."""
        regex = ('"' if open_quote else "") + f'{_STRING_CHAR}{{{lo},{"" if hi is None else hi}}}' + ('"' if close_quote else "")
        name = self.term(regex, hint)
        self.dfas[name] = counted_string_dfa(lo, hi, open_quote, close_quote)
        return name

    def _bounded(self, body: str, lo: int, hi: int | None, what: str, path: str) -> str:
        """A string whose JSON text between the quotes matches `body`, of lo..hi characters: the
        body alone where its own lengths imply the bounds, else the product of the two automata
        (bounds up to MAX_PRODUCT_LENGTH)."""
        regex = f'"{body}"'
        if not lo and hi is None:
            return self.term(regex, "PATTERN")
        text_lo, text_hi = sre_parse.parse(body, 0).getwidth()
        if -(-text_lo // 6) >= lo and (hi is None or text_hi <= hi):  # a character is 1..6 characters of JSON text
            return self.term(regex, "PATTERN")
        if max(lo, hi or 0) > MAX_PRODUCT_LENGTH:
            raise GrammarError(f"json_schema: {what} together with minLength / maxLength past {MAX_PRODUCT_LENGTH} at {path} cannot be enforced by this backend")
        where = f"json_schema: {what} at {path}"
        dfa = _product(terminal_dfa(regex, where), counted_string_dfa(lo, hi, True, True), True)
        if _empty(dfa):
            raise GrammarError(f"json_schema: no string matches {what} within minLength {lo} / maxLength {hi} at {path}")
        name = self.term(regex, "BOUNDED", unique=True)
        self.dfas[name] = dfa
        return name

    def _long_string(self, lo: int, hi: int | None) -> str:
        """A string of lo..hi characters past MAX_TERMINAL_LENGTH: chunks of exactly C characters
        (a terminal) counted by rules, then a closing terminal of fewer than C characters and the
        quote. The split is unique (each chunk is exactly C long, the rest shorter), so the lexer
        follows two configurations at most."""
        c = MAX_TERMINAL_LENGTH
        open_q = self.term('"', "QUOTE")
        chunk = self._counted(c, c, False, False, "CHUNK")

        def rest(r_lo: int, r_hi: int) -> str:  # the last r_lo..r_hi (< c) characters and the quote
            return self._counted(r_lo, r_hi, False, True, "STRTAIL")

        # after k chunks (k * c characters so far), the tail admits max(lo - k c, 0)..min(hi - k c, c - 1)
        kmax_lo = lo // c  # chunks that must come before the tail can close the string
        # The chain's rules are named outermost first: Lark's FIRST / FOLLOW analysis goes through
        # rules in that order, so FOLLOW reaches the innermost in one pass (innermost first, it took
        # one pass per rule: 23 s for the 1,024 rules of maxLength 65535).
        top = self._name("longstr")
        self.rules[top] = ""
        chain = [self._name("strk") for _ in range(kmax_lo + 1 if hi is None else hi // c)]
        self.rules.update(dict.fromkeys(chain, ""))
        if hi is None:
            # kmax_lo chunks first (their tail would be too short), then the remainder, or another
            # chunk and anything after it
            loop = self._name("strloop")
            self.rules[loop] = f"{chunk}* {rest(0, c - 1)}"  # left-recursive: the stack stays as deep
            body = chain[-1]
            self.rules[body] = f"{chunk} {loop} | {rest(lo - kmax_lo * c, c - 1)}"
            for name in reversed(chain[:-1]):
                self.rules[name] = f"{chunk} {body}"
                body = name
        else:
            kmax = hi // c
            body = rest(max(lo - kmax * c, 0), hi - kmax * c)
            for k in reversed(range(kmax)):
                r_lo, r_hi = max(lo - k * c, 0), min(hi - k * c, c - 1)
                alts = [f"{chunk} {body}"]
                if r_lo <= r_hi:
                    alts.append(rest(r_lo, r_hi))
                self.rules[chain[k]] = " | ".join(alts)
                body = chain[k]
        self.rules[top] = f"{open_q} {body}"
        return top

    def _object(self, node: dict[str, Any], path: str, refs: tuple[str, ...]) -> str:
        props = dict(node.get("properties") or {})
        if not isinstance(node.get("properties") or {}, dict):
            raise GrammarError(f"json_schema: 'properties' at {path} must be an object")
        patterns = node.get("patternProperties") or {}
        if not isinstance(patterns, dict):
            raise GrammarError(f"json_schema: 'patternProperties' at {path} must be an object")
        forbidden = list(node.get(FORBIDDEN, ()))
        required = set(node.get("required") or ())
        extra = node.get("additionalProperties", bool(self.open_objects))
        for pattern, sub in patterns.items():  # a declared name matching a pattern takes both schemas
            try:
                hits = [name for name in props if re.search(pattern, name)]
            except re.error as e:
                raise GrammarError(f"json_schema: patternProperties {pattern!r} at {path} is not a valid regex: {e}") from None
            for name in hits:
                props[name] = merge_schemas(props[name], sub, f"{path}/properties/{name}")
        comma = self.comma()
        members = [(name in required, f"{self.key(re.escape(json.dumps(name, ensure_ascii=False)))} {self.sym(sub, f'{path}/properties/{name}', refs)}")
                   for name, sub in props.items()]  # fmt: skip
        others: list[str] = []
        if patterns:
            others = self._pattern_members(patterns, [*props, *forbidden], extra, path, refs)
        elif extra is not False:
            value = self.any_value() if extra is True or extra == {} else self.sym(extra, f"{path}/additionalProperties", refs)
            others = [f"{self.key(_other_key(self, [*props, *forbidden]))} {value}"]
        # Optional members (declared or not) anywhere, in any order (a repeated key still validates:
        # each of its values satisfies the schema). Required ones in declared order (a rule per count
        # written), which keeps generation's keys forced, or in any order with `open_objects`
        # (instances written by others; up to _ANY_ORDER_REQUIRED of them: a rule per set written).
        # P[s]: the members so far, ending in state s. Left-linear: each member is reduced onto the
        # ones before it, so the parser's stack stays as deep however many members are written
        # (right-linear, it grew by one per member, and every member met stacks never seen before,
        # whose tokens crossing a lexeme's end were walked through the parser again).
        required_members = [m for req, m in members if req]
        optional = [m for req, m in members if not req] + others
        opt = self.rule(" | ".join(optional), "objopt") if optional else None
        r = len(required_members)
        any_order = self.open_objects and r <= _ANY_ORDER_REQUIRED

        def nxt(s: int) -> list[tuple[int, int]]:
            """(required member, next state) pairs: a state is the set of required members written
            (a bitmask) in any order, their count in declared order."""
            if any_order:
                return [(k, s | 1 << k) for k in range(r) if not s >> k & 1]
            return [(s, s + 1)] if s < r else []

        states = range(1 << r) if any_order else range(r + 1)
        P = {s: self._name("objp") for s in states}
        alts: dict[int, list[str]] = {s: [] for s in states}
        if opt:
            alts[0].append(opt)
        for k, t in nxt(0):
            alts[t].append(required_members[k])
        for s in states:  # a state's sources come before it (fewer required members written)
            if not alts[s]:
                continue  # no member leads here (state 0 without optional members)
            if opt:
                alts[s].append(f"{P[s]} {comma} {opt}")
            for k, t in nxt(s):
                alts[t].append(f"{P[s]} {comma} {required_members[k]}")
            self.rules[P[s]] = " | ".join(alts[s])
        lb = self.term(self.lbrace, "LBRACE", unique=True)
        rb = self.term(self.ws + "\\}", "RBRACE")
        final = states[-1]  # every required member written
        if r:
            return self.rule(f"{lb} {P[final]} {rb}", "obj")
        return self.rule(f"{lb} ({P[0]})? {rb}" if opt else f"{lb} {rb}", "obj")

    def _array(self, node: dict[str, Any], path: str, refs: tuple[str, ...]) -> str:
        items = node.get("items", True)
        prefix = node.get("prefixItems") or []
        if isinstance(items, list):  # draft 4-7 tuples
            prefix, items = items, node.get("additionalItems", True)
        elif "prefixItems" not in node and "additionalItems" in node:
            pass  # additionalItems only applies beside a tuple `items`
        lo = node.get("minItems", 0)
        hi = node.get("maxItems")
        for k, v in (("minItems", lo), ("maxItems", hi)):
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise GrammarError(f"json_schema: {k} at {path} must be a non-negative integer, got {v!r}")
        if items is False:
            hi = len(prefix) if hi is None else min(hi, len(prefix))
        if hi is not None and hi < lo:
            raise GrammarError(f"json_schema: array at {path} admits no value (minItems {lo} > maxItems {hi})")
        counted = max(lo, len(prefix), hi or 0)
        if counted > MAX_COUNTED_ITEMS:
            raise GrammarError(f"json_schema: minItems / maxItems / prefixItems at {path} count past {MAX_COUNTED_ITEMS} items: cannot be enforced by this backend")
        comma = self.comma()
        lb = self.term("\\[" + self.ws, "LBRACK", unique=True)
        rb = self.term(self.ws + "\\]", "RBRACK")
        if hi == 0:
            return self.rule(f"{lb} {rb}", "arr")

        def elem(j: int) -> str:
            if j < len(prefix):
                return self.sym(prefix[j], f"{path}/prefixItems/{j}", refs)
            return self.sym(items, f"{path}/items", refs)

        # A[j]: after j items (j >= 1)
        last = hi if hi is not None else max(lo, len(prefix))  # from `last` on (unbounded): a loop
        names = {j: self._name("arra") for j in range(1, last + 1)}
        for j in range(1, last + 1):
            if hi is not None and j == hi:
                self.rules[names[j]] = ""
                continue
            if hi is None and j == last:
                self.rules[names[j]] = f"({comma} {elem(j)})*"
                continue
            body = f"{comma} {elem(j)} {names[j + 1]}"
            self.rules[names[j]] = f"({body})?" if j >= lo else body
        if last == 0:  # unbounded, nothing required or prefixed
            loop = self._name("arra")
            self.rules[loop] = f"({comma} {elem(1)})*"
            first = f"{elem(0)} {loop}"
        else:
            first = f"{elem(0)} {names[1]}"
        return self.rule(f"{lb} ({first})? {rb}" if lo == 0 else f"{lb} {first} {rb}", "arr")

    def _pattern_members(self, patterns: dict[str, Any], names: list[str], extra: Any, path: str, refs: tuple[str, ...]) -> list[str]:
        """Members whose keys match a `patternProperties` pattern (values per its schema) and, unless
        additionalProperties is false, members whose keys match no pattern (values per it). Keys are
        written without escapes and differ from every declared name (those are members of their own);
        patterns some key matches two of are refused."""
        keys, others = self._pattern_keys_of(tuple(patterns), tuple(names), extra is not False, path)
        colon = self.term(f"{self.ws}:{self.ws}", "COLON")
        out = []
        for pattern, dfa in keys:
            name = self.term(f'"{KEY_CHAR}*"', "PKEY", unique=True)
            self.dfas[name] = dfa
            sub = patterns[pattern]
            out.append(f"{name} {colon} {self.sym(True if sub is True else sub, f'{path}/patternProperties/{pattern}', refs)}")
        if others is not None:
            name = self.term(f'"{KEY_CHAR}*"', "OKEY", unique=True)
            self.dfas[name] = others
            value = self.any_value() if extra is True or extra == {} else self.sym(extra, f"{path}/additionalProperties", refs)
            out.append(f"{name} {colon} {value}")
        return out

    def _pattern_keys_of(
        self, patterns: tuple[str, ...], names: tuple[str, ...], others: bool, path: str
    ) -> tuple[list[tuple[str, ByteDFA]], ByteDFA | None]:
        """_pattern_members' key automata: per pattern, its keys that are no declared name (none
        where it has none), and (`others`) the keys matching no pattern and no name. Kept per
        (patterns, names, others) within a schema: its objects often repeat them, and each set
        costs a product per pair of patterns."""
        held = self._pattern_keys.get((patterns, names, others))
        if held is not None:
            return held
        plain = terminal_dfa(f'"{KEY_CHAR}*"', "key")
        declared = words_dfa([json.dumps(n, ensure_ascii=False).encode() for n in names]) if names else None
        keys: list[tuple[str, ByteDFA]] = []
        for pattern in patterns:
            where = f"patternProperties {pattern!r} at {path}"
            dfa = _product(plain, terminal_dfa(f'"{json_string_body(pattern, where)}"', where), True)
            if declared is not None:
                dfa = _product(dfa, declared, False)
            for other_pattern, seen in keys:
                if not _empty(_product(dfa, seen, True)):
                    raise GrammarError(f"json_schema: patternProperties {other_pattern!r} and {pattern!r} at {path} overlap; cannot be enforced by this backend")
            keys.append((pattern, dfa))
        rest = None
        if others:
            rest = plain if declared is None else _product(plain, declared, False)
            for _, seen in keys:
                rest = _product(rest, seen, False)
            rest = None if _empty(rest) else rest
        held = self._pattern_keys[(patterns, names, others)] = ([(p, d) for p, d in keys if not _empty(d)], rest)
        return held
