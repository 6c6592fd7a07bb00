"""GBNF grammars to BNF rules without Lark's text round trip (ebnf_bnf.py, ebnf_gbnf.gbnf_rules):
the rules are those Lark compiles from the grammar's Lark text, so the LALR tables and their
conflicts are too, and the terminals' regexes are the languages Lark's would be."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lark.load_grammar import load_grammar

from loom.runtime.constrained import compile_grammar
from loom.runtime.constrained.dfa import terminal_dfa
from loom.runtime.constrained.ebnf_gbnf import gbnf_rules
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lalr import Rule, lalr_table
from loom.runtime.constrained.vocabulary import TokenVocab

from grammars import reachable_rules

RULES = ["root", "a", "b", "c"]


def _quantifier(draw) -> str:
    lo = draw(st.sampled_from([0, 0, 1, 2, 3, 51]))  # (past 50: Lark's sub-rules)
    return draw(st.sampled_from(["?", "*", "+", f"{{{lo}}}", f"{{{lo},}}", f"{{{lo},{lo + draw(st.sampled_from([0, 1, 2, 60]))}}}"]))


@st.composite
def expressions(draw, depth: int = 0) -> str:
    kind = draw(st.sampled_from(["lit", "class", "ref", "ref"] + (["seq", "alt", "rep"] if depth < 3 else [])))
    if kind == "lit":
        return draw(st.sampled_from(['"a"', '"b"', '"ab"', '"("', '"\\n"', '"é"']))
    if kind == "class":
        return draw(st.sampled_from(["[a-c]", "[^a]", "[0-9]"]))
    if kind == "ref":
        return draw(st.sampled_from(RULES[1:]))
    if kind == "rep":
        return f"({draw(expressions(depth + 1))}){_quantifier(draw)}"
    parts = draw(st.lists(expressions(depth + 1), min_size=2, max_size=3))
    return "(" + (" " if kind == "seq" else " | ").join(parts) + ")"


@st.composite
def grammars(draw) -> str:
    return "\n".join(f"{name} ::= {draw(expressions())}" for name in RULES)


def _lark_rules(source: str, start: str) -> list[Rule]:
    grammar, _ = load_grammar(source, "<string>", [], False)
    _terminals, rules, _ = grammar.compile([start], set())
    return [Rule(r.origin.name, tuple(s.name for s in r.expansion)) for r in rules]


def _lark_terminals(source: str, start: str) -> dict[str, str]:
    grammar, _ = load_grammar(source, "<string>", [], False)
    terminals, _rules, _ = grammar.compile([start], set())
    return {t.name: t.pattern.to_regexp() for t in terminals}


def _table(rules: list[Rule], start: str):
    try:
        t = lalr_table(rules, start)
    except GrammarError as e:
        return str(e)
    return [sorted(a.items(), key=str) for a in t.actions], t.end_state


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(grammars())
def test_the_rules_and_tables_are_those_lark_compiles_from_the_text(text):
    translated = gbnf_rules(text)
    ours = translated.rules()
    lark = _lark_rules(translated.lark_source(), translated.start)
    assert reachable_rules(ours, translated.start) == reachable_rules(lark, translated.start)
    assert _table(ours, translated.start) == _table(lark, translated.start)


@settings(max_examples=100, deadline=None)
@given(grammars())
def test_the_terminals_are_the_languages_lark_s_patterns_spell(text):
    translated = gbnf_rules(text)
    lark = _lark_terminals(translated.lark_source(), translated.start)
    for name, pattern in translated.terminals:
        if name in lark:  # (Lark drops a terminal no kept rule uses)
            ours, theirs = terminal_dfa(pattern, name), terminal_dfa(lark[name], name)
            assert np.array_equal(ours.table, theirs.table) and np.array_equal(ours.accepting, theirs.accepting)


VOCAB = TokenVocab.build({1: b"x", 2: b"(", 3: b")", 4: b"y", 5: b"xy"}, 6, frozenset({0}))


def _accepts(compiled, tokens: list[int]) -> bool:
    g = compiled.matcher()
    return all(g.accept_token(t) for t in tokens) and g.accept_token(0)


def test_a_recursive_item_repeated_zero_times_is_nothing():
    """`a{0}` of a recursive rule matches the empty string (Lark refused the text `(a ~ 1..0)?`)."""
    compiled = compile_grammar("ebnf", 'root ::= a{0} "x"\na ::= "(" a ")" | "y"', VOCAB)
    assert _accepts(compiled, [1]) and not _accepts(compiled, [4, 1])


@pytest.mark.parametrize("n", [40, 2000])
def test_a_rule_expanding_to_too_many_alternatives_is_refused(n):
    """2^n sequences, as Lark distributes them: refused, at once (2,000 optionals are past the
    recursion limit one level each)."""
    optionals = " ".join(f'a? "{i}"' for i in range(n))
    with pytest.raises(GrammarError, match=r"rule 'root': its optional and alternative parts expand to more than") as e:
        compile_grammar("ebnf", f'root ::= {optionals}\na ::= "(" a ")" | "y"', VOCAB)
    assert e.value.kind is ErrorKind.TOO_LARGE


def test_a_chain_of_thousands_of_rules_translates():
    n = 5000
    text = "\n".join(["root ::= r0", *(f'r{i} ::= "k" r{i + 1} | "z"' for i in range(n)), f"r{n} ::= root"])
    translated = gbnf_rules(text)
    assert len(translated.bodies) == n + 2


@pytest.mark.parametrize(
    ("text", "start_rule"),
    [('root ::= a | b\na ::= x "1"\nb ::= x "1"\nx ::= "(" x ")" | "y"', "root")],
)
def test_a_collision_names_the_gbnf_rules(text, start_rule):
    with pytest.raises(GrammarError, match=r"Reduce/Reduce collision") as e:
        compile_grammar("ebnf", text, VOCAB)
    assert "r_" not in str(e.value).split("(the grammar")[0]  # (the user's rule names, not the translation's)
