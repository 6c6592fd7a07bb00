"""Regex masks on Loom's byte DFA (runtime/constrained/regex_dfa.py): the cases outlines-core's Index
got wrong, a brute-force reference on random regexes, long string bounds, and decimals end to end."""

from __future__ import annotations

import itertools
import json
import re

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.constrained import ErrorKind, GrammarBackend, GrammarError, TokenVocab, allocate_token_bitmask, unpack_bitmask
from loom.runtime.constrained.dfa import terminal_dfa
from loom.runtime.constrained.regex_dfa import CompiledRegex
from loom.runtime.constrained.regex_syntax import category_ranges, sre_constants, sre_parse
from loom.runtime.entrypoints.engine import LocalEngine

V = 40


def allowed(grammar, vocab_size: int = V) -> set[int]:
    row = allocate_token_bitmask(1, vocab_size)
    grammar.fill_mask(row[0])
    return set(unpack_bitmask(row, vocab_size)[0].nonzero().view(-1).tolist())


# ----------------------------------------------------------------------------- outlines-core 0.2.14's misses

ISSUE_EOS = 3
ISSUE_VOCAB = {0: b"1", 1: b".", 2: b"2", 4: b".2", 5: b"x"}


@pytest.mark.parametrize(
    ("regex", "after_one"),
    [
        (r"1\.2", {1, 4}),
        (r"1(\.2)?", {1, 3, 4}),  # outlines-core: {3, 4}, no "."
        (r"1(x2)?", {3, 5}),  # outlines-core: {3}, no "x"
        (r"1(xx)?", {3, 5}),  # outlines-core: {3}, only EOS
    ],
)
def test_continuations_out_of_a_final_state(regex, after_one):
    backend = GrammarBackend(ISSUE_VOCAB, 8, frozenset({ISSUE_EOS}))
    g = backend.compile("regex", regex).result(timeout=30).matcher()
    assert allowed(g, 8) == {0}
    assert g.accept_token(0)
    assert allowed(g, 8) == after_one
    assert (ISSUE_EOS in after_one) == g.compiled.is_final(g.state)


def test_decimal_numbers_are_reachable():
    vocab = {1: b"1", 2: b"2", 3: b".", 4: b"12", 5: b".5", 6: b"5"}
    backend = GrammarBackend(vocab, 8, frozenset({0}))
    g = backend.compile("regex", r"[0-9]+(\.[0-9]+)?").result(timeout=30).matcher()
    assert g.accept_token(4)
    assert allowed(g, 8) == {0, 1, 2, 3, 4, 5, 6}  # more digits, ".", ".5" or EOS
    assert g.accept_token(3) and allowed(g, 8) == {1, 2, 4, 6}  # a digit must follow "."
    assert not g.is_terminated() and g.accept_token(6) and 0 in allowed(g, 8)


# ----------------------------------------------------------------------------- a brute-force reference

ALPHABET = "abc"
TOKENS = ["a", "b", "c", "ab", "ba", "bc", "ca", "cc", "abc", "aab"]
TOY_EOS = 0
TOY = {i + 1: t.encode() for i, t in enumerate(TOKENS)}


def _node():
    """Random regexes over ALPHABET as (text, slack): `slack` bounds how many more characters a
    prefix of a match needs to complete (so a search to that depth is an exact reference)."""
    atoms = st.sampled_from([("a", 1), ("b", 1), ("c", 1), ("[ab]", 1), ("[bc]", 1), ("ab", 2), ("ca", 2)])

    def extend(inner):
        quant = st.sampled_from(["?", "*", "+", "{2}", "{1,2}", "{0,2}", "{2,}"])
        group = inner.flatmap(lambda n: quant.map(lambda q: (f"(?:{n[0]}){q}", n[1] * (2 if q.startswith("{2") else 1))))
        alt = st.tuples(inner, inner).map(lambda p: (f"(?:{p[0][0]}|{p[1][0]})", max(p[0][1], p[1][1])))
        cat = st.tuples(inner, inner).map(lambda p: (p[0][0] + p[1][0], p[0][1] + p[1][1]))
        return st.one_of(group, alt, cat)

    return st.recursive(atoms, extend, max_leaves=6).filter(lambda n: n[1] <= 5)


def _completions(depth: int) -> list[str]:
    return ["".join(s) for n in range(depth + 1) for s in itertools.product(ALPHABET, repeat=n)]


class _Full:
    """`re.fullmatch` for these regexes without backtracking (nested quantifiers made Python's `re`
    take minutes on some draws): each node of `sre_parse`'s tree maps a set of start positions to
    the set of its end positions, a repetition iterating to a fixpoint."""

    def __init__(self, regex: str) -> None:
        self.tree = sre_parse.parse(regex)

    def fullmatch(self, text: str) -> bool:
        return len(text) in self._seq(self.tree, text, {0})

    def _seq(self, items, text: str, starts: set[int]) -> set[int]:
        for op, av in items:
            starts = self._one(op, av, text, starts)
            if not starts:
                break
        return starts

    def _one(self, op, av, text: str, starts: set[int]) -> set[int]:
        if op is sre_constants.LITERAL:
            return {i + 1 for i in starts if i < len(text) and ord(text[i]) == av}
        if op is sre_constants.IN:
            chars = {chr(v) for kind, v in av if kind is sre_constants.LITERAL}
            chars |= {chr(c) for kind, v in av if kind is sre_constants.RANGE for c in range(v[0], v[1] + 1)}
            return {i + 1 for i in starts if i < len(text) and text[i] in chars}
        if op is sre_constants.SUBPATTERN:
            return self._seq(av[-1], text, starts)
        if op is sre_constants.BRANCH:
            return set().union(*(self._seq(branch, text, starts) for branch in av[1]))
        if op in (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT):
            lo, hi, body = av
            out = starts if lo == 0 else set()
            cur, n = starts, 0
            while cur and (hi is sre_constants.MAXREPEAT or n < hi):
                cur, n = self._seq(body, text, cur), n + 1
                new = cur - out if n >= lo else cur
                if n >= lo:
                    out = out | cur
                if not new and n >= lo:  # (a fixpoint: more repetitions reach no new end)
                    break
            return out
        raise AssertionError(f"the reference does not read {op}")


def _viable(pattern: _Full, text: str, completions: list[str], memo: dict) -> bool:
    """Is `text` a prefix of some match? Full-match every completion (all strings up to the depth)."""
    hit = memo.get(text)
    if hit is None:
        hit = memo[text] = any(pattern.fullmatch(text + c) for c in completions)
    return hit


@pytest.fixture(scope="module")
def toy() -> GrammarBackend:
    return GrammarBackend(TOY, V, frozenset({TOY_EOS}))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=_node(), data=st.data())
def test_masks_equal_the_brute_force_reference_along_random_walks(toy, node, data):
    regex, slack = node
    pattern = _Full(regex)
    g = toy.compile("regex", regex).result(timeout=30).matcher()
    memo: dict[str, bool] = {}
    completions = _completions(slack)
    text = ""
    for _ in range(5):
        want = {t for t, b in TOY.items() if _viable(pattern, text + b.decode(), completions, memo)}
        if pattern.fullmatch(text):
            want.add(TOY_EOS)
        assert allowed(g) == want, (regex, text)
        forced = g.forced_bytes().decode()
        assert all(c.startswith(forced) for c in completions if pattern.fullmatch(text + c)), (regex, text, forced)
        assert g.is_terminated() == (want == {TOY_EOS})
        steps = sorted(want - {TOY_EOS})
        if not steps:
            break
        token = data.draw(st.sampled_from(steps))
        assert g.accept_token(token)
        text += TOY[token].decode()
    refused = [t for t in TOY if t not in allowed(g)]
    for t in refused:  # a refused token leaves the state as it was
        before = g.state
        assert not g.accept_token(t) and g.state == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # monkeypatch.context() per example
@given(node=_node(), data=st.data())
def test_the_c_subset_step_gives_the_python_steps_masks(monkeypatch, node, data):
    """A lazy DFA built by the C subset step (subset_native.py) and one built by the Python step
    give the same masks, forced bytes and states along the same random walk."""
    from loom.runtime.constrained import lazy_dfa, regex_dfa, subset_native

    regex = node[0]
    vocab = TokenVocab.build(TOY, V, frozenset({TOY_EOS}))
    with monkeypatch.context() as m:
        m.setattr(regex_dfa, "EAGER_BUDGET_S", 0.0)
        c = CompiledRegex(regex, vocab, lazy=True)
        m.setattr(lazy_dfa, "native_available", lambda: False)
        py = CompiledRegex(regex, vocab, lazy=True)
    assert py._lazy is not None and py._lazy._native is None
    assert c._lazy is not None and (c._lazy._native is not None) == subset_native.available()
    a, b = c.matcher(), py.matcher()
    for _ in range(6):
        assert allowed(a) == allowed(b) and a.forced_bytes() == b.forced_bytes() and a.state == b.state
        steps = sorted(allowed(a) - {TOY_EOS})
        if not steps:
            break
        token = data.draw(st.sampled_from(steps))
        assert a.accept_token(token) and b.accept_token(token)


# ----------------------------------------------------------------------------- bounds and limits


def test_masks_are_scanned_at_compile_time_and_equal_the_lazy_ones(monkeypatch):
    from loom.runtime.constrained import regex_dfa

    vocab = TokenVocab.build(TOY, V, frozenset({TOY_EOS}))
    regex = r"(?:ab|c){1,3}b?a*(?:ca)?"
    monkeypatch.setattr(regex_dfa, "PRECOMPUTE_TIME_S", 60.0)  # every state, however slow the machine is now
    eager = CompiledRegex(regex, vocab)
    monkeypatch.setattr(regex_dfa, "PRECOMPUTE_TIME_S", 0.0)
    lazy = CompiledRegex(regex, vocab)
    assert set(lazy._words) == {int(lazy.mask_class[lazy.initial_state])}  # the initial state's only
    assert set(eager._words) == set(eager.mask_class[: eager.dead].tolist())  # every live state's class

    def no_scan(state: int):
        raise AssertionError(f"state {state} scanned after compile")

    monkeypatch.setattr(eager, "_scan", no_scan)
    for state in range(eager.dead):
        got, want = eager.mask(state), lazy.mask(state)
        assert got[0].tolist() == want[0].tolist() and got[1] == want[1]


def test_long_string_bounds_compile_and_end_exactly():
    schema = {"type": "string", "minLength": 150, "maxLength": 200}
    byte_vocab = {i: bytes([i]) for i in range(1, 128)}
    backend = GrammarBackend(byte_vocab, 128, frozenset({0}))
    h = backend.compile("json_schema", json.dumps(schema)).result(timeout=60).matcher()
    assert h.accept_token(ord('"'))
    for i in range(200):
        assert (ord('"') in allowed(h, 128)) == (i >= 150), i
        assert h.accept_token(ord("x"))
    assert allowed(h, 128) == {ord('"')} and h.forced_bytes() == b'"'
    assert h.accept_token(ord('"')) and h.is_terminated()


def test_exploding_automata_are_refused_with_a_clear_error():
    vocab = TokenVocab.build({1: b"a", 2: b"b"}, 4, frozenset({0}))
    with pytest.raises(GrammarError, match="more than 2000 automaton states"):
        CompiledRegex(r"(a|b)*a(a|b){12}", vocab, max_states=2000)
    with pytest.raises(GrammarError, match="cannot be compiled: look-aheads"):
        CompiledRegex(r"a(?=b)", vocab)
    with pytest.raises(GrammarError, match="matches nothing"):
        CompiledRegex(r"[^\x00-\U0010FFFF]", vocab)
    backend = GrammarBackend({1: b"a"}, 4, frozenset({0}))
    schema = {"type": "string", "pattern": "a(?!b)"}
    with pytest.raises(GrammarError, match="'pattern' at # uses a look-around"):
        backend.compile("json_schema", json.dumps(schema)).result(timeout=30)


def test_a_regex_matching_nothing_says_so_by_its_kind():
    vocab = TokenVocab.build({1: b"a", 2: b"b"}, 4, frozenset({0}))
    with pytest.raises(GrammarError) as err:
        CompiledRegex(r"[^\x00-\U0010FFFF]", vocab)
    assert err.value.kind is ErrorKind.EMPTY
    with pytest.raises(GrammarError) as err:
        CompiledRegex(r"a(?=b)", vocab)
    assert err.value.kind is ErrorKind.INVALID
    assert terminal_dfa(r"[^\x00-\U0010FFFF]", "terminal").dead == 0  # a terminal's empty language: the empty automaton


# ----------------------------------------------------------------------------- end to end


NUMBER_SCHEMA = {
    "type": "object",
    "properties": {"price": {"type": "number"}, "weight": {"type": "number"}},
    "required": ["price", "weight"],
}


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    path = make_tiny_model("qwen2", vocab_size=512, seed=11)
    with LocalEngine(model_path=str(path), max_total_tokens=8192, debug_check_memory=True) as eng:
        yield eng


def test_json_numbers_at_temperature_one_produce_decimals_and_validate(engine):
    params = [{"json_schema": json.dumps(NUMBER_SCHEMA), "temperature": 1.0, "max_new_tokens": 80, "seed": s} for s in range(12)]
    outs = engine.generate([f"Item {i}:" for i in range(12)], params)
    values = []
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        value = json.loads(out["text"])
        jsonschema.validate(value, NUMBER_SCHEMA)
        values += [value["price"], value["weight"]]
    assert any(isinstance(v, float) for v in values), values  # "." after digits is allowed again


def test_long_max_length_schema_outputs_validate(engine):
    schema = {"type": "object", "properties": {"note": {"type": "string", "maxLength": 200}}, "required": ["note"]}
    outs = engine.generate(
        ["a", "b"], [{"json_schema": json.dumps(schema), "temperature": 1.0, "max_new_tokens": 300, "seed": s} for s in range(2)]
    )
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)


def test_allowed_ids_list_the_mask_when_it_is_small():
    """`allowed_ids(limit)`: a state's allowed tokens as ids when at most `limit`, else None; the
    same set as the packed mask (EOS included where the regex may end)."""
    from loom.runtime.constrained.bitmask import sparse_ids

    vocab = {i: bytes([b]) for i, b in enumerate(b"0123456789abcdef")}
    backend = GrammarBackend(vocab, vocab_size=20, eos_token_ids=frozenset({19}))
    matcher = backend.compile("regex", "[0-9]{1,2}").result().matcher()
    assert matcher.allowed_ids(10).tolist() == list(range(10))  # digits only: no EOS yet
    assert matcher.allowed_ids(9) is None
    assert matcher.accept_token(3)
    assert matcher.allowed_ids(20).tolist() == list(range(10)) + [19]  # may end: EOS too
    row = allocate_token_bitmask(1, 20)
    matcher.fill_mask(row[0])
    assert unpack_bitmask(row, 20)[0].nonzero().view(-1).tolist() == matcher.allowed_ids(20).tolist()
    assert sparse_ids(row[0], 20).tolist() == matcher.allowed_ids(20).tolist()


@pytest.mark.parametrize("ascii_only", [False, True])
@pytest.mark.parametrize("name", ["DIGIT", "SPACE", "WORD"])
def test_categories_hold_the_code_points_python_s_str_tests_accept(name, ascii_only):
    """\\d \\s \\w as Python's str regexes read them: Unicode decimals, whitespace, alphanumerics and
    `_` (re.ASCII: their ASCII members; its \\s is C's isspace)."""
    test = {"DIGIT": str.isdecimal, "SPACE": str.isspace, "WORD": lambda ch: ch.isalnum() or ch == "_"}[name]
    if ascii_only and name == "SPACE":
        test = lambda ch: ch in " \t\n\r\x0b\x0c"  # noqa: E731
    top = 0x7F if ascii_only else 0x10FFFF
    inside = np.zeros(top + 1, dtype=bool)
    for lo, hi in category_ranges(name, ascii_only):
        inside[lo : hi + 1] = True
    assert inside.tolist() == [test(chr(cp)) for cp in range(top + 1)]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab{}[]()?*+.^$|\\-&~# \n\t\"'é日,:;0_")), min_size=1, max_size=12))
def test_a_literal_terminal_s_direct_automaton_is_the_regex_s(text):
    """A terminal that is a plain literal (every metacharacter escaped) is built as a chain of states
    (dfa._literal, words_dfa), not through the regex: the very automaton the regex gives, states
    numbered alike; regexes that are not plain literals still take the regex path."""
    from loom.runtime.constrained import dfa as dfa_module

    pattern = re.escape(text)
    assert dfa_module._literal(pattern) == text
    fast = terminal_dfa(pattern, "literal")
    table, byte_class, accepting = dfa_module.subset_table(pattern, "literal", 1 << 30, float("inf"))
    slow = dfa_module.minimal_dfa(table, accepting, byte_class)
    assert np.array_equal(fast.table, slow.table) and np.array_equal(fast.accepting, slow.accepting)
    for other in (pattern + "+", f"(?:{pattern})", pattern + r"\d", "[" + pattern + "]", pattern + "\\"):
        assert dfa_module._literal(other) is None
