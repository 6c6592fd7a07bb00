"""A schema's automaton built from cached pieces and spliced repetition copies (regex_pieces.py,
nfa.py) is the automaton of the regex parsed whole: on hand-made, format-heavy and random schemas,
and on random regexes against Python's own `re`. The lazy DFA's subset step in C
(subset_native.py) builds the very table of its Python step, state for state."""

from __future__ import annotations

import functools
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.constrained import nfa as nfa_module
from loom.runtime.constrained import subset_native
from loom.runtime.constrained.dfa import determinise
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lazy_dfa import SubsetDFA
from loom.runtime.constrained.regex_pieces import PIECE_BASE, PIECE_END, RegexPieces
from loom.runtime.constrained.schema import schema_regexes, schema_to_regex

DFA = tuple[np.ndarray, np.ndarray, np.ndarray]  # (table [S + 1, C], byte -> class [256], accepting [S + 1])


def built_lazily(regex: str, pieces: RegexPieces | None) -> DFA:
    dfa = SubsetDFA(regex, "test", 1 << 20, pieces)
    assert dfa.explore(float("inf"))
    if subset_native.available():  # else SubsetDFA runs the Python step alone
        both_steps_agree(regex, pieces)
    return dfa.eager()


def both_steps_agree(regex: str, pieces: RegexPieces | None, max_states: int = 1 << 20, order: list[int] | None = None) -> None:
    """The C step and the Python step build the same states (same NFA subsets, same numbering),
    rows and byte classes: breadth first, or expanding the states in `order` (ids past the states
    built are skipped)."""
    py = SubsetDFA(regex, "test", max_states, pieces, native=False)
    c = SubsetDFA(regex, "test", max_states, pieces, native=True)
    if order is None:
        assert py.explore(float("inf")) == c.explore(float("inf"))
    for q in order or ():
        if q < py.num_states:
            py.expand(q)
            c.expand(q)
    n = py.num_states
    assert c.num_states == n and (c.byte_class == py.byte_class).all() and c.n_cls == py.n_cls
    assert (c.table[:n] == py.table[:n]).all() and (c.accepting[:n] == py.accepting[:n]).all()
    assert (c.expanded[:n] == py.expanded[:n]).all()
    assert c._native is not None and all(c._native.members(q) == py._subsets[q] for q in range(n))


def same_language(a: DFA, b: DFA) -> bool:
    """Both DFAs (start 0, every state but the dead one live) accept the same byte strings."""
    (ta, ca, aa), (tb, cb, ab) = a, b
    columns = sorted({(int(ca[x]), int(cb[x])) for x in range(256)})  # bytes neither DFA tells apart read alike
    seen, todo = {(0, 0)}, [(0, 0)]
    while todo:
        p, q = todo.pop()
        if aa[p] != ab[q]:
            return False
        for i, j in columns:
            nxt = (int(ta[p, i]), int(tb[q, j]))
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return True


def check_schema(schema: dict) -> RegexPieces | None:
    regex, pieces = schema_regexes(json.dumps(schema))
    assert regex == schema_to_regex(json.dumps(schema))
    whole = determinise(regex, "test", 1 << 20, float("inf"))  # parsed whole, as before
    assert same_language(built_lazily(regex, pieces), whole), schema
    return pieces


EMAIL = {"type": "string", "format": "email"}
DATE_TIME = {"type": "string", "format": "date-time"}
HAND_MADE = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "email": EMAIL}, "required": ["name", "age"]},
    {"type": "object", "properties": {"event": {"type": "string"}, "start": DATE_TIME, "end": DATE_TIME,
                                      "attendees": {"type": "array", "items": EMAIL}, "priority": {"enum": ["low", "high", None]}},
     "required": ["event", "start", "attendees"]},
    {"type": "object", "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"}, "q": {"type": "string", "pattern": 'a"\\\\b\\n'},
                                      "n": {"type": "number", "minimum": -5, "exclusiveMaximum": 10}}, "required": ["id"]},
    # branches that are each only a piece: the parser folds single-character branches into a set
    {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "time"}, {"type": "integer", "minimum": 3}]},
    {"type": "array", "items": {"anyOf": [{"type": "string", "format": "uuid"}, {"type": "string", "format": "date"}]}, "maxItems": 3},
    {"type": "object", "properties": {"meta": {}, "tags": {"type": "array", "items": {"enum": [{"a": 1}, [1, 2]]}},
                                      "title": {"type": "string", "maxLength": 12}}, "additionalProperties": {"type": "integer", "maximum": 9}},
]  # fmt: skip


@pytest.mark.parametrize("schema", HAND_MADE, ids=range(len(HAND_MADE)))
def test_pieces_give_the_automaton_of_the_whole_regex(schema):
    assert check_schema(schema) is not None  # every one of these has pieces


def test_a_text_that_could_spell_a_sentinel_keeps_the_whole_regex():
    schema = {"type": "object", "properties": {"k": {"const": chr(PIECE_BASE + 1)}, "d": DATE_TIME}, "required": ["k", "d"]}
    assert check_schema(schema) is None
    assert RegexPieces.fill('"S0" \\U0010ff00', ["x"], {0}, '"S{}"') is None


@pytest.mark.parametrize("regex", [r"\d{4}-\d{2}(\.\d{1,6})?", r"(?:\w|é)+\s?\d", r"[^a]{2}\w*", r"(?i:\w{2})x|\d+"])
def test_a_large_character_set_spliced_gives_the_automaton_built_inline(monkeypatch, regex):
    """Sets of more UTF-8 sequences than SPLICE_SEQUENCES (Unicode \\d, \\w, a negated set) are
    built once and spliced, filled in as read: the same language as each built in place, the
    same states on the C and the Python step, and the set's fragment made once."""
    monkeypatch.setattr(nfa_module, "_pieces", type(nfa_module._pieces)())
    spliced = built_lazily(regex, None)
    sets = {id(frag) for frag in nfa_module._pieces.values()}
    assert sets and sets <= {id(frag) for _, frag in nfa_module.build_nfa(regex, lazy=True)[0].spliced}
    monkeypatch.setattr(nfa_module, "_pieces", type(nfa_module._pieces)())
    monkeypatch.setattr(nfa_module, "SPLICE_SEQUENCES", 1 << 30)
    inline = built_lazily(regex, None)
    assert not nfa_module._pieces and same_language(spliced, inline)


def test_a_piece_is_parsed_once_and_the_cache_stays_bounded(monkeypatch):
    monkeypatch.setattr(nfa_module, "_pieces", type(nfa_module._pieces)())
    monkeypatch.setattr(nfa_module, "_pieces_states", 0)
    parsed = []
    real = nfa_module.sre_parse.parse
    monkeypatch.setattr(nfa_module.sre_parse, "parse", lambda p, f=0: parsed.append(p) or real(p, f))
    date, pair = chr(PIECE_BASE), chr(PIECE_BASE + 1)
    pieces = {PIECE_BASE: "[0-9]{4}-[0-9]{2}", PIECE_BASE + 1: "(?:ab|cd)+"}
    regex = f"x{date}{chr(PIECE_END)}|y{pair}{chr(PIECE_END)}"
    for _ in range(3):
        nfa_module.build_nfa(regex, pieces=pieces)
    assert sorted(p for p in parsed if p != regex) == sorted(pieces.values())  # once each, not once per regex
    monkeypatch.setattr(nfa_module, "PIECE_CACHE_STATES", 40)
    for n in range(2, 12):
        nfa_module.piece_fragment(f"[a-z]{{{n}}}", 32, "test")
    assert nfa_module._pieces_states <= 40
    assert ("[a-z]{11}", 32) in nfa_module._pieces and (pieces[PIECE_BASE], 32) not in nfa_module._pieces  # LRU


LEAVES = st.sampled_from([
    {"type": "string", "format": f} for f in ("date-time", "date", "time", "email", "uuid", "uri", "ipv4")
] + [
    {"type": "string", "pattern": p} for p in ("^[a-c]+$", "x[0-9]{2}", "^(?:ab|c)?$", "é.")
] + [
    {"type": "integer", "minimum": 0, "maximum": 99}, {"type": "integer", "minimum": -3}, {"type": "number", "maximum": 5},
    {}, {"enum": [{"x": 1}, "y"]}, {"type": "string", "maxLength": 5}, {"type": "boolean"}, {"enum": ["p", None]},
])  # fmt: skip


def _compose(children: st.SearchStrategy) -> st.SearchStrategy:
    obj = st.dictionaries(st.sampled_from(["a", "b", "c"]), children, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(
            lambda req, extra: {
                "type": "object",
                "properties": props,
                "required": req,
                **({"additionalProperties": extra} if extra else {}),
            },
            st.lists(st.sampled_from(sorted(props)), unique=True),
            st.sampled_from([None, True, {"type": "integer", "maximum": 3}]),
        )
    )
    arr = st.builds(lambda it, n: {"type": "array", "items": it, **({"maxItems": n} if n else {})}, children, st.sampled_from([None, 2]))
    any_of = st.lists(children, min_size=2, max_size=3).map(lambda bs: {"anyOf": bs})
    return st.one_of(obj, arr, any_of)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(LEAVES, _compose, max_leaves=4))
def test_pieces_give_the_automaton_of_the_whole_regex_on_random_schemas(schema):
    check_schema(schema)


REGEX_ATOMS = st.sampled_from(["a", "b", "é", "[ab]", "[^a]", "(?:ab|b)", "\\d", ".", "(?:a|)"])


def _regex(children: st.SearchStrategy) -> st.SearchStrategy:
    bound = st.sampled_from(["{2}", "{0,3}", "{1,2}", "{2,}", "*", "?", "+"])
    return st.one_of(
        st.builds(lambda r, b: f"(?:{r}){b}", children, bound),
        st.lists(children, min_size=2, max_size=3).map("".join),
        st.lists(children, min_size=2, max_size=3).map(lambda rs: "(?:" + "|".join(rs) + ")"),
    )


@settings(max_examples=40, deadline=None)
@given(st.recursive(REGEX_ATOMS, _regex, max_leaves=5), st.lists(st.text(alphabet="abé1\n", max_size=8), max_size=12), st.data())
def test_spliced_repetition_copies_match_what_python_matches(regex, texts, data):
    table, byte_class, accepting = built_lazily(regex, None)
    texts = texts + [data.draw(st.from_regex(re.compile(regex), fullmatch=True), "a match")]

    def accepts(text: str) -> bool:
        q = 0
        for b in text.encode("utf-8", "surrogatepass"):
            q = int(table[q, byte_class[b]])
        return bool(accepting[q])

    for text in texts:
        if any(0xD800 <= ord(ch) <= 0xDFFF for ch in text):
            continue  # no UTF-8 encoding: no token can spell it
        assert accepts(text) == bool(re.fullmatch(regex, text)), (regex, text)


BENCH_LIKE = [
    r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,80}"',  # a `maxLength: 80` string
    r"(?:[a-z]{1,3}[0-9]?){1,12}",
    r"[^\x00-\U0010ffff]|ab",  # an empty set: some NFA states cannot reach the end
    r"x[^\x00-\U0010ffff]?y{2,5}(?:é|[^\x00-\U0010ffff]z)*",
    r"(?:\d+|[^\d]{2})(?:\.\d{1,3})?",
]


@pytest.mark.skipif(not subset_native.available(), reason="no C compiler on this machine: SubsetDFA runs its Python step")
@pytest.mark.parametrize("regex", BENCH_LIKE)
def test_the_c_subset_step_builds_the_python_steps_table(regex):
    both_steps_agree(regex, None)
    both_steps_agree(regex, None, max_states=12)  # past the bound both narrow to the same dead ends
    both_steps_agree(regex, None, order=[0, 3, 2, 7, 5, 1, 4, 9])  # numbering follows the order states are built


@pytest.mark.skipif(not subset_native.available(), reason="no C compiler on this machine: SubsetDFA runs its Python step")
def test_the_c_subset_step_on_format_heavy_schemas_and_its_fall_back(monkeypatch):
    for schema in HAND_MADE:
        regex, pieces = schema_regexes(json.dumps(schema))
        both_steps_agree(regex, pieces)
        both_steps_agree(regex, pieces, order=[0, 5, 3, 11, 2, 8])
    with pytest.raises(GrammarError) as e:
        SubsetDFA(r"[^\x00-\U0010ffff]", "regex 'nothing'", 100, native=True)
    assert e.value.kind is ErrorKind.EMPTY and "matches nothing" in str(e.value)
    monkeypatch.setenv("LOOM_NO_C_SUBSET", "1")
    monkeypatch.setattr(subset_native, "_library", functools.cache(subset_native._library.__wrapped__))
    assert not subset_native.available() and SubsetDFA("ab", "test", 100)._native is None
