"""Split rows crossed where a run ends (ebnf_runs.py, EbnfMasks._run_ends): a number's digits are
split only where its run ends when no digit may follow it, and every split is kept where one may;
the C rows equal the numpy ones. The masks stay what a brute-force walk of every token allows."""

from __future__ import annotations

import numpy as np
import pytest

from loom.runtime.constrained import TokenVocab, compile_grammar, ebnf_masks, ebnf_runs

from grammars import DIGITS_LARK, allowed_tokens, brute_force_tokens, tiny_vocab

EOS = 0


@pytest.fixture(scope="module")
def vocab() -> TokenVocab:
    return tiny_vocab([b"120x", b"10xab", b"h12", b"h120x", b"12+3", b"7+", b"1+2,", b"0x", b"12,", b"99", b"123456", b"(1", b"1)"], EOS)


def test_a_number_s_digits_are_split_only_where_its_run_ends_or_a_digit_may_follow(vocab, monkeypatch):
    """After a number where only "+" may follow, a token of digits is crossed where its digits end
    (its splits inside them are dead); after "h", where a hexadecimal literal starting with "0"
    follows, every split is kept ("h120x..." is 12 then 0x...), and "120x" is allowed there."""
    compiled = compile_grammar("lark", DIGITS_LARK, vocab)
    ids = {b: t for t, b in vocab.by_id.items()}
    seen = []
    real = ebnf_masks.EbnfMasks._run_ends

    def spy(self, t, sid, splits):
        parts = real(self, t, sid, splits)
        seen.append((len(splits), parts[0] is splits))
        return parts

    monkeypatch.setattr(ebnf_masks.EbnfMasks, "_run_ends", spy)
    for text in ([b"12+3"], [b"h12"], [b"1+2,", b"h"]):
        g = compiled.matcher()
        for piece in text:
            assert g.accept_token(ids[piece]), (text, piece)
            assert allowed_tokens(compiled, g.state) == brute_force_tokens(compiled, g.state, EOS), (text, piece)
    g = compiled.matcher()
    assert g.accept_token(ids[b"h"])
    assert ids[b"120x"] in allowed_tokens(compiled, g.state)
    assert any(n >= 2 and not whole for n, whole in seen)  # pruned where only "+" follows
    assert any(n >= 2 and whole for n, whole in seen)  # kept whole where "0x" may follow
    digits = next(t for t in range(len(compiled.dfas)) if compiled.first_bytes(compiled.offsets[t]) == frozenset(b"0123456789"))
    assert ebnf_runs.staying_bytes(compiled.dfas[digits]) == frozenset(b"0123456789")


@pytest.mark.parametrize("listable", [True, False])
def test_the_c_run_ends_equal_the_numpy_ones(listable):
    """Random split rows at offsets with gaps: each row less the next (where that is at the next
    offset), big and few rows and the few rows' listing, alike in C and in numpy."""
    if ebnf_runs._library() is None:
        pytest.skip("no C compiler: only the numpy rows exist")
    rnd = np.random.default_rng(0)
    width = 64
    for trial in range(20):
        offsets = sorted(rnd.choice(np.arange(1, 40), size=int(rnd.integers(2, 12)), replace=False).tolist())
        bits = {j: (rnd.random((width, 32)) < rnd.choice([0.002, 0.05, 0.5])).astype(np.uint32) for j in offsets}
        splits = {j: (b << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32) for j, b in bits.items()}
        js = np.array(offsets, dtype=np.int64)
        rows = np.stack([splits[j] for j in offsets])
        c = ebnf_runs._c_run_ends(ebnf_runs._library(), rows, js, 40, listable)
        py = ebnf_runs._numpy_run_ends(rows, js, 40, listable)
        for a, b in zip(c[:2], py[:2]):
            assert sorted(a) == sorted(b) and all((a[j] == b[j]).all() for j in a), trial
        assert (c[2] is None) == (py[2] is None), trial
        if c[2] is not None:
            assert c[2][0].tolist() == py[2][0].tolist() and c[2][1].tolist() == py[2][1].tolist() and c[2][2][2] == py[2][2][2], trial
