"""Plain Lark grammars read without Lark (lark_plain.py): the rules and LALR tables are those Lark
compiles, on random plain grammars and on JSON-Schema grammars; anything outside the subset is
left to Lark."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lark.load_grammar import load_grammar

from loom.runtime.constrained import ebnf
from loom.runtime.constrained.ebnf_bnf import to_bnf
from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.lalr import Rule, lalr_table
from loom.runtime.constrained.lark_plain import plain_lark
from loom.runtime.constrained.schema_grammar import DEFAULT_WHITESPACE, schema_to_grammar

from grammars import canonical_table, reachable_rules

RULES = ["start", "a", "b", "c"]
TERMINALS = {"X": "x", "Y": "y", "ZED": "z"}


@st.composite
def bodies(draw, depth: int = 0) -> str:
    items = draw(st.lists(st.sampled_from(RULES[1:] + list(TERMINALS) + (["(group)"] if depth < 2 else [])), max_size=3))
    out = []
    for item in items:
        if item == "(group)":
            item = "(" + " | ".join(draw(st.lists(bodies(depth + 1), min_size=1, max_size=3))) + ")"
        out.append(item + draw(st.sampled_from(["", "", "?", "*", "+"])))
    return " ".join(out)


@st.composite
def grammars(draw) -> str:
    lines = [f"{name}: {' | '.join(draw(st.lists(bodies(), min_size=1, max_size=3)))}" for name in RULES]
    lines[0] += " | " + " ".join(TERMINALS)  # (every terminal used: an unused one is left to Lark, below)
    return "\n".join(lines + [f'{name}: "{lit}"' for name, lit in TERMINALS.items()])


def _lark_rules(source: str) -> list[Rule]:
    grammar, _ = load_grammar(source, "<string>", [], False)
    _terminals, rules, _ = grammar.compile(["start"], set())
    return [Rule(r.origin.name, tuple(s.name for s in r.expansion)) for r in rules]


def _table(rules: list[Rule]):
    try:
        t = lalr_table(rules, "start")
    except GrammarError as e:
        return str(e)
    return [sorted(a.items(), key=str) for a in t.actions], t.end_state


@settings(max_examples=300, deadline=None)
@given(grammars())
def test_random_plain_grammars_get_lark_s_rules_and_tables(text):
    plain = plain_lark(text)
    assert plain is not None
    ours, lark = to_bnf(plain.bodies), _lark_rules(text)
    assert reachable_rules(ours, "start") == reachable_rules(lark, "start")
    assert _table(ours) == _table(lark)


@pytest.mark.parametrize(
    "text",
    [
        'start: "x"',  # a literal in a rule
        "start: A\nA: /x/",  # a regex terminal
        '?start: A\nA: "a"',  # a rule modifier
        'start: a\na.2: A\nA: "a"',  # a priority
        'start: A\nA: "a"\n%ignore A',
        'start: A // the start\nA: "a"',
        'start: [A]\nA: "a"',
        'start: A ~ 3\nA: "a"',
        'start: A -> b\nA: "a"',
        'start: A\n    | A A\nA: "a"',  # a continued rule
        'start: B\nA: "a"',  # an undefined name
        'start: A\nA: "a"\nB: "b"',  # an unused terminal
        'start: A\nA: "a"\nA: "b"',  # a name defined twice
        'a: A\nA: "a"',  # no start
    ],
)
def test_what_is_not_plain_is_left_to_lark(text):
    assert plain_lark(text) is None


def test_a_plain_grammar_s_errors_are_lark_s():
    with pytest.raises(GrammarError, match="Reduce/Reduce collision"):
        ebnf.lark_tables('start: a X | b X\na: Y\nb: Y\nX: "x"\nY: "y"')
    with pytest.raises(GrammarError, match="undefined|not defined"):
        ebnf.lark_tables('start: B\nA: "a"')  # (left to Lark, which names it)


SCHEMAS = [
    {"$defs": {"node": {"type": "object", "properties": {"name": {"type": "string"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                        "required": ["name"]}}, "$ref": "#/$defs/node"},
    {"type": "object", "patternProperties": {"^x-": {"type": "integer"}}, "properties": {"id": {"type": "string"}}, "required": ["id"]},
    {"type": "array", "items": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "object", "properties": {"v": {"enum": [1, "a", None]}}}]}},
]  # fmt: skip


@pytest.mark.parametrize("schema", SCHEMAS, ids=["recursive", "pattern properties", "long strings"])
def test_json_schema_grammars_are_plain_and_get_lark_s_tables(schema, monkeypatch):
    source, _dfas = schema_to_grammar(json.dumps(schema), DEFAULT_WHITESPACE, False)
    assert plain_lark(source) is not None
    ours = ebnf.lark_tables(source)
    monkeypatch.setattr(ebnf, "plain_lark", lambda text: None)
    theirs = ebnf.lark_tables(source)
    assert ours.terminals == theirs.terminals and ours.ignore_tokens == theirs.ignore_tokens == []
    assert _table_of(ours) == _table_of(theirs)


def _table_of(tables):
    t = tables.parse_table
    return canonical_table(dict(enumerate(t.actions)), t.start_state, t.end_state)
