"""Terminals imported from Lark's library, read once per process (lark_imports): a grammar built
with the cached import has Lark's own terminals, rules and table, and one grammar's edits of an
imported terminal do not reach the next grammar."""

from __future__ import annotations

import lark
import pytest
from lark import load_grammar

from loom.runtime.constrained.lark_imports import _LIBRARIES, install, replaced

from grammars import JSON_LARK

GRAMMARS = {
    "json": JSON_LARK,
    "aliases and a helper's name taken": """
start: MYINT ("," NUMBER)* DIGIT?
DIGIT: "x"
%import common.INT -> MYINT
%import common (NUMBER, WS_INLINE)
%ignore WS_INLINE
""",
    "an imported terminal extended": """
start: WORD+
%import common.WORD
%extend WORD: "-"
%import common.WS
%ignore WS
""",
    "an imported terminal in a terminal": """
start: PAIR+
PAIR: LETTER "=" DIGIT
%import common (LETTER, DIGIT)
""",
}


def _shape(parser: lark.Lark):
    table = parser.parser.parser.parser.parse_table
    terminals = sorted((t.name, t.pattern.to_regexp(), t.priority) for t in parser.terminals)
    order = {}  # states numbered in the order a walk from the start meets them (Lark's numbers vary)
    work = sorted(table.start_states.values())
    while work:
        state = work.pop(0)
        if state not in order:
            order[state] = len(order)
            work += [arg for _, (action, arg) in sorted(table.states[state].items()) if action.name == "Shift"]
    states = {
        order[s]: sorted((k, a.name, str(order[arg] if a.name == "Shift" else arg)) for k, (a, arg) in acts.items())
        for s, acts in table.states.items()
    }
    return terminals, sorted(str(r) for r in parser.rules), sorted(parser.ignore_tokens), states


def _build(source: str, cached: bool) -> lark.Lark:
    assert install() and replaced
    builder = load_grammar.GrammarBuilder
    if not cached:
        builder.do_import = replaced[0]
    try:
        return lark.Lark(source, parser="lalr", lexer="basic")
    finally:
        install()


@pytest.mark.parametrize("name", list(GRAMMARS))
def test_a_grammar_built_with_the_cached_import_is_lark_s_own(name):
    _LIBRARIES.clear()
    own = _shape(_build(GRAMMARS[name], cached=False))
    assert _shape(_build(GRAMMARS[name], cached=True)) == own  # (read the library)
    assert _shape(_build(GRAMMARS[name], cached=True)) == own  # (from what was read)
    assert ("common",) in _LIBRARIES


def test_an_extended_import_does_not_reach_the_next_grammar():
    extended = _build(GRAMMARS["an imported terminal extended"], cached=True)
    assert extended.parse("ab - cd")
    plain = _build("start: WORD+\n%import common.WORD\n%import common.WS\n%ignore WS", cached=True)
    with pytest.raises(lark.exceptions.UnexpectedInput):
        plain.parse("ab - cd")


@pytest.mark.parametrize(
    "source",
    [
        "start: NOPE\n%import common.NOPE",  # a name the library lacks
        "start: WORD\nWORD: /x/\n%import common.WORD",  # a name the grammar defines
        "start: WS\n%import common.WS\n%import unicode.WS",  # a name imported twice
        "start: A\n%import nolib.A",  # a library that does not exist
    ],
)
def test_a_bad_import_fails_as_lark_s_own_does(source):
    errors = []
    for cached in (False, True):
        with pytest.raises(Exception) as e:
            _build(source, cached=cached)
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
