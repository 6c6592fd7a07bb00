"""counted_scan.py: a counted string's lexer-state scans, answered from the vocabulary's character
profile, equal the generic trie walk (ebnf_scan.lexeme_scan, every node walked) in every state
between characters, on a vocabulary of multi-byte characters, escapes, quotes, controls and tokens
that end inside a character; a string's contents are recognised in any terminal that holds them;
and a grammar's masks along random walks are the brute-force walk's, with and without the path."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from loom.runtime.constrained import (
    TokenVocab,
    compile_grammar,
    counted_scan,
    ebnf_masks,
    ebnf_scan,
    ebnf_walk,
)
from loom.runtime.constrained.dfa import terminal_dfa
from loom.runtime.constrained.json_regex import DEFAULT_WHITESPACE
from loom.runtime.constrained.schema_automata import STRING_CHAR, counted_string_dfa
from loom.runtime.constrained.schema_grammar import schema_to_grammar
from loom.runtime.constrained.token_walk import BUCKET_BIT, token_trie

from grammars import allowed_tokens, brute_force_tokens

pytestmark = pytest.mark.skipif(not counted_scan.available(), reason="no C compiler: the generic scans answer")

EOS = 0
# Pieces a token is made of: one-byte characters, escapes (whole and cut), multi-byte characters
# (whole and cut), quotes, bytes no string holds (controls, a lone continuation byte), DEL.
PIECES = [b"a", b"Z", b"7", b" ", b"-", b"{", b"e", b'\\"', b"\\n", b"\\u00e9", b"\\u0", b"\\", "é".encode(), "中".encode(),
          "中".encode()[:2], "🙂".encode(), "🙂".encode()[:1], b'"', b'"', b",", b":", b"}", b"\x01", b"\n", b"\x80", b"\x7f"]  # fmt: skip


@pytest.fixture(scope="module")
def vocab() -> TokenVocab:
    rnd = random.Random(0)
    found: set[bytes] = {bytes([b]) for b in range(1, 256)}  # every byte alone
    while len(found) < 1400:
        found.add(b"".join(rnd.choice(PIECES) for _ in range(rnd.randint(1, 9))))
    found |= {b"x" * n for n in (20, 40, 70)} | {b"x" * 30 + b'"}', "é".encode() * 12 + b'",'}  # past a chunk's length
    tb = {i + 1: b for i, b in enumerate(sorted(found))}
    return TokenVocab.build(tb, len(tb) + 1, frozenset({EOS}))


def _between_characters(dfa) -> list[int]:
    return np.flatnonzero(dfa.counted.copy >= 0).tolist()


SHAPES = [(0, None, True), (3, None, True), (0, 5, True), (2, 7, True), (1, 64, True), (0, 63, True), (100, 200, True),
          (5, 5, False), (12, 12, False), (64, 64, False), (100, 100, False), (3, 8, False)]  # fmt: skip


@pytest.mark.parametrize("lo,hi,close", SHAPES)
@pytest.mark.parametrize("open_quote", [False, True])
def test_a_counted_scan_equals_the_trie_walk_in_every_state_between_characters(vocab, lo, hi, close, open_quote):
    dfa = counted_string_dfa(lo, hi, open_quote, close)
    trie = token_trie(vocab)
    states = _between_characters(dfa)
    assert len(states) >= min(hi if hi is not None else lo, 10)
    for state in states:
        found = counted_scan.counted_scan(vocab, dfa.counted, state, 0)
        if not close and lo != hi:  # a lexeme ending after a range of counts, without a quote: the generic scan's
            assert found is None
            continue
        inside, splits = ebnf_scan.lexeme_scan(trie, vocab, dfa.table, dfa.accepting, state, 0, ebnf_scan.NO_SKIP)
        assert np.array_equal(found.inside, inside), (lo, hi, close, state)
        assert found.splits.keys() == splits.keys(), (lo, hi, close, state, sorted(found.splits), sorted(splits))
        for j, row in found.rows.items():
            assert np.array_equal(row.words, splits[j]), (lo, hi, close, state, j)
            if row.ids is not None:  # the ids a crossing walks are the row's tokens
                assert np.array_equal(np.sort(row.ids[0]), np.flatnonzero(np.unpackbits(row.words.view(np.uint8), bitorder="little")))
    assert counted_scan.counted_scan(vocab, dfa.counted, dfa.dead, 0) is None  # (dead: not between characters)
    if open_quote:  # before the opening quote, and entered mid-token: the generic scans
        assert counted_scan.counted_scan(vocab, dfa.counted, 0, 0) is None
    assert counted_scan.counted_scan(vocab, dfa.counted, states[0], 1) is None


def test_the_tails_of_a_split_row_are_its_tokens_whose_later_bytes_are_safe(vocab):
    trie = token_trie(vocab)
    for lo, hi, close in [(12, 12, False), (64, 64, False), (0, 63, True)]:
        dfa = counted_string_dfa(lo, hi, False, close)
        for state in _between_characters(dfa)[:20]:
            unsafe = ebnf_scan.safe_run(dfa.table, dfa.accepting, state, trie.max_depth)[0]
            for j, row in counted_scan.counted_scan(vocab, dfa.counted, state, 0).rows.items():
                tails = counted_scan.split_tails(row, trie, j, unsafe)
                ids = np.flatnonzero(np.unpackbits(tails.view(np.uint8), bitorder="little"))
                assert not (tails & ~row.words).any()
                for t in ids.tolist():
                    assert all(not int(BUCKET_BIT[b]) & unsafe for b in vocab.by_id[t][j:]), (state, j, vocab.by_id[t])
                if row.plain is not None:  # a chunk's row at its end: every ASCII token longer than it is a tail
                    assert not (row.plain & ~tails).any()


def test_a_string_s_contents_are_recognised_in_any_terminal():
    plain = terminal_dfa(f'"{STRING_CHAR}*"', "string")
    inside = int(plain.table[0, ord('"')])
    assert counted_scan.string_contents(plain, inside) is not None
    assert counted_scan.string_contents(plain, 0) is None  # before the quote
    scalar = terminal_dfa(f'"{STRING_CHAR}*"|-?[0-9]+|true|null', "scalar")
    assert counted_scan.string_contents(scalar, int(scalar.table[0, ord('"')])) is not None
    assert counted_scan.string_contents(scalar, int(scalar.table[0, ord("7")])) is None
    escaped = int(plain.table[inside, ord("\\")])  # inside an escape: not between characters
    assert counted_scan.string_contents(plain, escaped) is None
    for regex in ('"[a-z]*"', f'"{STRING_CHAR}{{0,5}}"', f'"{STRING_CHAR}*"x'):  # other languages
        dfa = terminal_dfa(regex, regex)
        assert counted_scan.string_contents(dfa, int(dfa.table[0, ord('"')])) is None, regex


SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 150}, "b": {"type": "string"},
                                           "c": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 5}}}}  # fmt: skip


def _allowed(compiled, state) -> set[int]:
    return allowed_tokens(compiled, state)


def _brute(compiled, state) -> set[int]:
    return brute_force_tokens(compiled, state, EOS)


def test_masks_along_random_walks_equal_the_brute_force_walk_with_and_without_the_path(vocab, monkeypatch):
    source, dfas = schema_to_grammar(json.dumps(SCHEMA), DEFAULT_WHITESPACE, False)
    fast = compile_grammar("lark", source, vocab, terminal_dfas=dfas)
    used = []
    real = ebnf_masks.counted_scan

    def spy(*args):
        found = real(*args)
        used.append(found is not None)
        return found

    monkeypatch.setattr(ebnf_masks, "counted_scan", spy)
    walks = []
    for seed in range(3):
        rnd = random.Random(seed)
        g = fast.matcher()
        states = []
        single = {b: t for t, b in vocab.by_id.items() if len(b) == 1}
        for b in b'{"a":"':  # into the long string, then random tokens
            assert g.accept_token(single[bytes([b])])
        for _ in range(40):
            allowed = sorted(_allowed(fast, g.state) - {EOS})
            states.append(g.state)
            if not allowed:
                break
            g.accept_token(rnd.choice(allowed))
        walks.append(states)
    assert sum(used) > 20
    monkeypatch.setattr(ebnf_masks, "counted_scan", lambda *args: None)
    slow = compile_grammar("lark", source, vocab, terminal_dfas=dfas)
    for states in walks:
        for step, state in enumerate(states):
            got = _allowed(fast, state)
            assert got == _allowed(slow, state), step
            if step % 4 == 0:
                assert got == _brute(fast, state), (step, sorted(got ^ _brute(fast, state))[:10])


def test_a_string_s_quote_rows_crossed_in_one_walk_equal_each_row_crossed(vocab):
    """ebnf_walk's cross_list (every closing-quote row at once, each token from its own offset)
    lets cross exactly what crossing each row at its offset does, at every stack a walk meets."""
    source, dfas = schema_to_grammar(json.dumps(SCHEMA), DEFAULT_WHITESPACE, False)
    compiled = compile_grammar("lark", source, vocab, terminal_dfas=dfas)
    found = counted_scan.counted_scan(vocab, counted_scan._contents()[2], 0, 0)
    assert found.listed is not None and len(found.rows) > 3
    walker = ebnf_walk.CrossingWalker(compiled)
    g = compiled.matcher()
    single = {b: t for t, b in vocab.by_id.items() if len(b) == 1}
    stacks = set()
    for b in b'{"a":"x","b":"y","c":["ab","cd"':
        assert g.accept_token(single[bytes([b])])
        stacks |= {c // compiled.n_lex for c in g.state}
    crossed = 0
    for sid in sorted(stacks):
        at_once = np.zeros(found.inside.shape, dtype=np.uint32)
        walker.cross_list(sid, found.listed[2], at_once)
        each = np.zeros_like(at_once)
        for j, row in found.rows.items():
            shared, own = np.zeros(3 * len(each), dtype=np.uint32), np.zeros(2 * len(each), dtype=np.uint32)
            walker.cross(j, sid, row.words, shared, own, each, 1 << 30, row.ids[0])
        assert np.array_equal(at_once, each), sid
        crossed += int(np.bitwise_count(each).sum())
    assert crossed > 10


def test_compiling_a_counted_string_s_grammar_answers_every_count_s_scan_ahead(vocab, monkeypatch):
    """compile_grammar takes each count's scan of a counted string's lexeme on the compiling thread
    (warm_counts), so no mask that reaches a count computes it: with the computing parts removed
    after the compile, every count still has its answer."""
    source, dfas = schema_to_grammar(json.dumps({"type": "string", "minLength": 1, "maxLength": 150}), DEFAULT_WHITESPACE, False)
    compiled = compile_grammar("lark", source, vocab, terminal_dfas=dfas)
    shapes = [dfa.counted for dfa in compiled.dfas if dfa.counted is not None]
    assert len(shapes) >= 2  # the chunk and a tail
    profile = counted_scan._profile(vocab, token_trie(vocab), counted_scan._library())

    def computed(*args):
        raise AssertionError("a count's scan was computed after the compile")

    monkeypatch.setattr(profile, "quote_rows", computed)
    monkeypatch.setattr(profile, "chunk_rows", computed)
    for shape in shapes:
        for state in np.flatnonzero(shape.copy >= 0).tolist():
            assert counted_scan.counted_scan(vocab, shape, state, 0) is not None
    assert not counted_scan.warm_counts(vocab, shapes[0], deadline=0.0)  # past its deadline, it takes none
