"""Lark grammars read without Lark's loader (lark_plain.py): on random grammars in the common
syntax, on known ones and on JSON-Schema grammars, the terminals, the rules and the LALR tables
are those Lark compiles, and a grammar Lark refuses is refused; anything outside the subset is
left to Lark."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark.exceptions import GrammarError as LarkGrammarError
from lark.load_grammar import load_grammar

from loom.runtime.constrained import ebnf
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lalr import Rule, lalr_table
from loom.runtime.constrained.lark_plain import plain_lark
from loom.runtime.constrained.schema_grammar import DEFAULT_WHITESPACE, schema_to_grammar

from grammars import canonical_table

RULES = ["start", "a", "_b", "c"]
NAMES = ["a", "_b", "c", "X", "Y", "_Z", "INT", "LETTER"]
LITERALS = ['"x"', '"y"', '"("', '","', '"if"', '"ab"', '"\\""', '"q"i', "/[0-9]+/", "/x/", "/a|b/i", '"a".."c"']
TERMINALS = {
    "X": ['"x"', '"x" | "xx"', "/x+/"],
    "Y": ['"y"', '"if"', "X Y2? LETTER", '"a".."c"'],
    "_Z": ['"z"~2', '("z" | X)~1..3', '"("', "/[0-9]+/"],
    "Y2": ['"2"', '[INT] "."'],
}


@st.composite
def bodies(draw, depth: int = 0) -> str:
    kinds = NAMES + LITERALS + (["(group)", "[group]"] if depth < 2 else [])
    out = []
    for item in draw(st.lists(st.sampled_from(kinds), max_size=3)):
        if item in ("(group)", "[group]"):
            inner = " | ".join(draw(st.lists(bodies(depth + 1), min_size=1, max_size=3)))
            item = f"({inner})" if item[0] == "(" else f"[{inner}]"
        out.append(item + draw(st.sampled_from(["", "", "", "?", "*", "+", " ~ 2", "~0..2"])))
    return " ".join(out)


@st.composite
def grammars(draw) -> str:
    lines = ["%import common (INT, LETTER)"] if draw(st.booleans()) else ["%import common.INT", "%import common.LETTER"]
    for name in RULES:
        mods = draw(st.sampled_from(["", "", "?", "!", "?!"] if not name.startswith("_") else ["", "!"]))
        priority = draw(st.sampled_from(["", "", ".2", ".-1"]))
        alternatives = []
        for body in draw(st.lists(bodies(), min_size=1, max_size=3)):
            alias = draw(st.sampled_from(["", "", "", " -> al", " -> other"]))
            alternatives.append(body + (alias if not name.startswith("_") else ""))
        joiner = draw(st.sampled_from([" | ", "\n    | ", " // note\n  | "]))
        lines.append(f"{mods}{name}{priority}: {joiner.join(alternatives)}")
    for name, choices in TERMINALS.items():
        lines.append(f"{name}{draw(st.sampled_from(['', '.3']))}: {draw(st.sampled_from(choices))}")
    if draw(st.booleans()):
        lines += ["%import common.WS", "%ignore WS"]
    return "\n".join(lines) + "\n"


def lark_compile(text: str):
    """Lark's own loader and compile (its import of the library, not Loom's cache)."""
    grammar, _ = load_grammar(text, "<string>", [], False)
    terminals, rules, ignore = grammar.compile(["start"], set())
    return (
        {t.name: t.pattern.to_regexp() for t in terminals},
        [Rule(r.origin.name, tuple(s.name for s in r.expansion), r.options.priority or 0) for r in rules],
        ignore,
    )


def ours_compile(text: str):
    plain = plain_lark(text)
    assert plain is not None, text
    compiled = plain.compile()
    if compiled is None:
        return None
    terminals, rules, ignore = compiled
    return dict(terminals), rules, ignore


def _table(rules: list[Rule]):
    try:
        t = lalr_table(rules, "start")
    except GrammarError as e:
        return str(e)
    return canonical_table(dict(enumerate(t.actions)), t.start_state, t.end_state)


def assert_as_lark(text: str) -> None:
    try:
        ours_compile(text)
    except GrammarError as e:
        if e.kind is ErrorKind.TOO_LARGE:  # (Loom's bound on alternatives, which Lark lacks: ebnf_bnf)
            return
    try:
        theirs = lark_compile(text)
    except LarkGrammarError as e:  # Lark refuses it: so do we (or we leave it to Lark, which says why)
        try:
            assert ours_compile(text) is None, (text, e)
        except GrammarError as ours:
            assert str(ours).split(":")[0] == str(e).split(":")[0], (str(ours), str(e))
        return
    ours = ours_compile(text)
    assert ours is not None, text
    assert ours[0] == theirs[0]
    assert ours[1] == theirs[1]
    assert ours[2] == theirs[2]
    assert _table(ours[1]) == _table(theirs[1])


@settings(max_examples=400, deadline=None)
@given(grammars())
def test_random_grammars_get_lark_s_terminals_rules_and_tables(text):
    assert_as_lark(text)


JSON = r"""
?start: value
?value: object
      | array
      | string
      | SIGNED_NUMBER      -> number
      | "true"             -> true
      | "false"            -> false
      | "null"             -> null
array  : "[" [value ("," value)*] "]"
object : "{" [pair ("," pair)*] "}"
pair   : string ":" value
string : ESCAPED_STRING
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""
CALC = r"""
?start: sum
      | NAME "=" sum    -> assign_var
?sum: product
    | sum "+" product   -> add
    | sum "-" product   -> sub
?product: atom
    | product "*" atom  -> mul
    | product "/" atom  -> div
?atom: NUMBER           -> number
     | "-" atom         -> neg
     | NAME             -> var
     | "(" sum ")"
%import common.CNAME -> NAME
%import common.NUMBER
%import common.WS_INLINE
%ignore WS_INLINE
"""
KNOWN = {
    "json": JSON,
    "json, terminals of its own": JSON.replace(
        "%import common.ESCAPED_STRING", 'ESCAPED_STRING: "\\"" _STRING_INNER* "\\""\n_STRING_INNER: /[^"\\\\]/ | /\\\\./'
    ),
    "literals named as Lark names them": 'start: "(" "if" "+" IF ")" "iff" "Iff" "a b"\nIF: "if"\n',
    "a literal that is a terminal's pattern": 'start: "x" X Y "y"\nX: "x"\nY: "y"\n',
    "[a] [a] collides": 'start: [A] [A]\nA: "a"\n',
    "a? a? does not": 'start: A? A?\nA: "a"\n',
    "aliases keep alternatives apart": 'start: A -> one\n    | A -> two\nA: "a"\n',
    "an alias on an inlined rule": 'start: _a\n_a: A -> one | B\nA: "a"\nB: "b"\n',
    "unused rules and terminals": 'start: A\nb: b A | B\nc: d\nd: c\nB: "b"\nA: "a"\nC: "c"\n',
    "priorities": 'start: a | b\na.2: A\nb: A\nA: "a"\n',
    "keep all tokens": '!start: ["x" A] ["x" A]\nA: "a"\n',
}


@pytest.mark.parametrize("text", KNOWN.values(), ids=KNOWN.keys())
def test_known_grammars_are_read_as_lark_reads_them(text):
    assert_as_lark(text)


def test_calc_is_left_to_lark():
    assert plain_lark(CALC) is None  # (`%import ... -> NAME`)
    assert ebnf.lark_tables(CALC).terminals  # and Lark reads it


@pytest.mark.parametrize(
    "text",
    [
        "start: a{B}\na{x}: x\nB: /b/",  # a template
        'start: A\nA: "a"\n%declare B',
        'start: A\nA: "a"\n%ignore "a"',  # an ignored expression
        "start: A\n%import .other.A",  # a relative import
        "start: A\n%import common.CNAME -> A",  # an aliased import
        "start: A\n%import common.NOT_THERE",
        'start: A \\\n  A\nA: "a"',  # a backslash continuation
        'start: B\nA: "a"',  # an undefined name
        'start: A\nA: "a"\nA: "b"',  # a name defined twice
        'start: A\nA: "a"\n%import common.A',  # an import over a definition
        'a: A\nA: "a"',  # no start
        'start: __A\n__A: "a"',  # a reserved name
        "start: A\nA: a\na: B\nB: /b/",  # a rule in a terminal
        "start: A\nA: B\nB: A",  # a recursive terminal
        'start: A\nA: "ab".."c"',  # a bad range
        "start: Aa\nAa: /a/",  # a mixed-case name
        'start: A\nA: "a"i "b"\nB: "\n"',  # a string over two lines
        "start: (A\n A)\nA: /a/",  # a line break inside parentheses
        "start: A -> B\nA: /a/",  # an alias to a terminal
        "start: (A -> b)\nA: /a/",  # an alias inside a group
        "start: T0\n" + "".join(f'T{i}: T{i + 1} "a"\n' for i in range(400)) + 'T400: "b"',  # terminals 400 deep
    ],
)
def test_what_is_not_in_the_subset_is_left_to_lark(text):
    plain = plain_lark(text)
    assert plain is None or plain.compile() is None


def test_errors_are_lark_s():
    with pytest.raises(GrammarError, match="Reduce/Reduce collision"):
        ebnf.lark_tables('start: a X | b X\na: Y\nb: Y\nX: "x"\nY: "y"')
    with pytest.raises(GrammarError, match="Rules defined twice"):
        ebnf.lark_tables('start: [A] [A]\nA: "a"')
    with pytest.raises(GrammarError, match="isn't allowed to have aliases"):
        ebnf.lark_tables('start: _a\n_a: A -> one | B\nA: "a"\nB: "b"')
    with pytest.raises(GrammarError, match="undefined|not defined"):
        ebnf.lark_tables('start: B\nA: "a"')  # (left to Lark, which names it)


SCHEMAS = [
    {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                        "required": ["name"]}}, "$ref": "#/$defs/node"},
    {"type": "object", "patternProperties": {"^x-": {"type": "integer"}}, "properties": {"id": {"type": "string"}}, "required": ["id"]},
    {"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "object", "properties": {"v": {"enum": [1, "a", None]}}}]}},
]  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS, ids=["recursive", "pattern properties", "long strings"])
def test_json_schema_grammars_are_read_and_get_lark_s_tables(schema):
    source, _dfas = schema_to_grammar(json.dumps(schema), DEFAULT_WHITESPACE, False)
    assert plain_lark(source) is not None
    assert_as_lark(source)


def test_lark_tables_reads_the_subset_itself(monkeypatch):
    """The engine's path (ebnf.lark_tables) gives the same tables with or without Lark's loader."""
    ours = ebnf.lark_tables(JSON)
    monkeypatch.setattr(ebnf, "plain_lark", lambda text: None)
    theirs = ebnf.lark_tables(JSON)
    assert dict(ours.terminals) == dict(theirs.terminals) and ours.ignore_tokens == theirs.ignore_tokens == ["WS"]
    t1, t2 = ours.parse_table, theirs.parse_table
    assert canonical_table(dict(enumerate(t1.actions)), t1.start_state, t1.end_state) == canonical_table(
        dict(enumerate(t2.actions)), t2.start_state, t2.end_state
    )
