"""DeRemer and Pennello's digraph on an explicit stack (lalr_digraph): the same sets as Lark's
recursive digraph, on any relation, and no RecursionError on a chain far past the limit."""

from __future__ import annotations

import sys
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st
from lark.parsers import lalr_analysis

from loom.runtime.constrained import compile_grammar
from loom.runtime.constrained.lalr_digraph import digraph
from loom.runtime.constrained.vocabulary import TokenVocab


def _lark_digraph():
    return lalr_analysis.digraph


def _inputs(n: int, edges: list[tuple[int, int]], own: list[set[int]]):
    R = defaultdict(set)
    for a, b in edges:
        R[a % n].add(b % n)
    G = defaultdict(set, {i: set(own[i]) for i in range(n) if own[i]})
    return list(range(n)), R, G


def _shape(F: dict, G: dict, n: int):
    """F's sets, which nodes share one set object, and what G holds after (the analysis updates G in place)."""
    ids = {}
    shared = [ids.setdefault(id(F[x]), len(ids)) for x in range(n)]
    return [sorted(F[x]) for x in range(n)], shared, {k: sorted(v) for k, v in G.items()}


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12).flatmap(lambda n: st.tuples(
    st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=30),
    st.lists(st.sets(st.integers(0, 9), max_size=3), min_size=n, max_size=n))))  # fmt: skip
def test_the_sets_equal_larks_on_any_relation(case):
    n, edges, own = case
    X, R, G = _inputs(n, edges, own)
    X2, R2, G2 = _inputs(n, edges, own)
    assert _shape(digraph(X, R, G), G, n) == _shape(_lark_digraph()(X2, R2, G2), G2, n)


def test_a_chain_far_past_the_recursion_limit():
    n = 20 * sys.getrecursionlimit()
    R = defaultdict(set, {i: {i + 1} for i in range(n - 1)})
    G = defaultdict(set, {n - 1: {"end"}, 0: {"start"}})
    F = digraph(list(range(n)), R, G)
    assert F[0] == {"start", "end"} and F[n // 2] == F[n - 1] == {"end"}


def test_a_grammar_whose_relation_chain_is_thousands_long_compiles():
    """Under the default recursion limit (Lark's recursive digraph failed there, or not, by the
    hash seed's order)."""
    n = 3000
    chain = "start: a0\n" + "".join(f'a{i}: "x" a{i + 1} | "z"\n' for i in range(n)) + f'a{n}: "w"\n'
    vocab = TokenVocab.build({1: b"x", 2: b"z", 3: b"w", 4: b"xx"}, 5, frozenset({0}))
    g = compile_grammar("lark", chain, vocab).matcher()
    assert all(g.accept_token(t) for t in (4, 1, 2))  # "xxxz"
    assert g.accept_token(0) and g.is_terminated()
