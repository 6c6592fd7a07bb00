"""GBNF text read without Lark's parser (ebnf_gbnf.read_gbnf): on random texts, well formed or not,
the tree is the one Lark's parser makes (nodes, token types, lines), and a text Lark refuses is
left to Lark, which says what is wrong."""

from __future__ import annotations

import lark
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.runtime.constrained.ebnf_gbnf import LARK_PARSER, read_gbnf

FRAGMENTS = ["root ::=", "a ::=", "b::=", "a", "b", "x.y-z", '"x"', '"\\n"', '"a\\"b"', "[a-z]", "[^\\]]", "[\\n]", ".", "(", ")",
             "|", "*", "+", "?", "{2}", "{1,3}", "{ 2 , }", "{}", "# a comment\n", "\n", "::=", '"', "[", "-", ":"]  # fmt: skip
SEPARATORS = [" ", " ", "", "\n", "\t", "\n\n  "]


@st.composite
def texts(draw) -> str:
    parts = draw(st.lists(st.tuples(st.sampled_from(FRAGMENTS), st.sampled_from(SEPARATORS)), min_size=1, max_size=14))
    start = draw(st.sampled_from(["root ::= ", "", "  root ::=\n"]))
    return start + "".join(f + sep for f, sep in parts)


def _lines(tree) -> list:
    return [(t.type, t.line) for t in tree.scan_values(lambda v: isinstance(v, lark.Token))]


def assert_as_lark(text: str) -> None:
    ours = read_gbnf(text)
    try:
        theirs = LARK_PARSER.parse(text)
    except lark.exceptions.LarkError:
        assert ours is None, text
        return
    assert ours is not None, text
    assert ours == theirs
    assert _lines(ours) == _lines(theirs)


@settings(max_examples=1500, deadline=None)
@given(texts())
def test_random_texts_are_read_as_lark_reads_them(text):
    assert_as_lark(text)


@pytest.mark.parametrize(
    "text",
    [
        'root ::= "a" b*\nb ::= [0-9]{1,3} | ( "x" . )+ # done',
        "root ::=\nx ::= y\ny ::= (x)?",  # an empty rule, then rules
        "root ::= (a ::= b)",  # a rule inside parentheses: Lark's error
        "root ::= a)",
        "root ::= a**",
        "",
        "  # only a comment",
    ],
)
def test_known_texts(text):
    assert_as_lark(text)
