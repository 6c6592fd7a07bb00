"""Masks taken at a stack's top frames (ebnf_tops.py, lalr_native.top_frames): they stay exactly what
a brute-force walk of every token allows, also where a stand-in proves too short, and deep nesting
costs no new walks."""

from __future__ import annotations

import pytest

from loom.runtime.constrained import TokenVocab, compile_grammar, ebnf_tops, ebnf_walk
from loom.runtime.constrained.json_regex import DEFAULT_WHITESPACE
from loom.runtime.constrained.lalr_native import BottomRead
from loom.runtime.constrained.schema_grammar import schema_to_grammar

from grammars import ARITH_GBNF, DIGITS_LARK, JSON_GBNF, JSON_LARK, allowed_tokens, brute_force_tokens, random_walk, tiny_vocab

pytestmark = pytest.mark.skipif(not ebnf_walk.available(), reason="no C compiler: stacks are Python lists, no stand-ins")

EOS = 0
SCHEMA = '{"type": "object", "properties": {"a": {"type": "array", "items": {"$ref": "#"}}, "n": {"type": "integer"}}}'
GRAMMARS = {
    "arith gbnf": ("ebnf", ARITH_GBNF),
    "json gbnf": ("ebnf", JSON_GBNF),
    "json lark": ("lark", JSON_LARK),
    "digits lark": ("lark", DIGITS_LARK),
    "schema": ("lark", *schema_to_grammar(SCHEMA, DEFAULT_WHITESPACE, False)),
}
# Tokens that open or close several levels at once, and numbers that run into what follows.
EXTRA = [b"((", b"(((", b"(1", b"1)", b"2))", b")))", b"))+(", b" (", b"[[", b"]]", b"]]]", b"[{", b'[{"', b"}]", b"}]}", b'"a":[',
         b'"n":1', b'{"', b'":', b" [", b"120x", b"10xab", b"h12", b"h120x", b"12+3", b"7+", b"1+2,", b"0x", b"12,", b"99", b"123456"]  # fmt: skip


@pytest.fixture(scope="module")
def vocab() -> TokenVocab:
    return tiny_vocab(EXTRA, EOS)


def _compile(name: str, vocab: TokenVocab):
    kind, source, *dfas = GRAMMARS[name]
    return compile_grammar(kind, source, vocab, terminal_dfas=dfas[0] if dfas else None)


def _walk(compiled, seed: int, steps: int = 40) -> list[frozenset[int]]:
    """States along a random walk that prefers the tokens opening levels (so stacks grow deep)."""
    return random_walk(compiled, seed, steps, set(range(1024, 1024 + len(EXTRA))), 0.7, EOS)


@pytest.mark.parametrize("frames", [(1, 2, 4), (3,), ebnf_tops.FRAMES], ids=["1-2-4 frames", "3 frames", "default frames"])
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_masks_at_stand_ins_equal_a_brute_force_walk(vocab, name, frames, monkeypatch):
    """With stand-ins of very few frames, most masks read under them (BottomRead) and are taken
    again on more: what the failed tries kept must be right, and every mask is still exactly the
    tokens a walk of each through the whole stack accepts (the EOS bit too, read at the real stack)."""
    monkeypatch.setattr(ebnf_tops, "FRAMES", frames)
    compiled = _compile(name, vocab)
    for seed in range(3):
        for step, state in enumerate(_walk(compiled, seed)):
            fast, brute = allowed_tokens(compiled, state), brute_force_tokens(compiled, state, EOS)
            assert fast == brute, (name, seed, step, sorted(fast ^ brute)[:10])
    tops = compiled.masks._tops
    if frames != ebnf_tops.FRAMES:
        assert any(short != sid for sid, short in tops._of.items()), name  # (stand-ins were used)
    if frames == (1, 2, 4) and name != "digits lark":
        assert tops.too_short, name  # (and some were too short: taken again; digits lark's stacks read no deeper)


@pytest.mark.parametrize("name, opening", [("arith gbnf", [b"1", b" +", b" ("]), ("json gbnf", [b'{"', b"a", b'":', b" ["])])
def test_deeper_nesting_costs_no_new_walks(vocab, name, opening, monkeypatch):
    """A parenthesis (an array) at depth 20 reads no more of the stack than one at depth 10, so its
    masks are the stand-in's, already taken: past the first levels no token is walked again and no
    mask is computed anew, and the masks are still the brute-force ones."""
    compiled = _compile(name, vocab)
    ids = {b: t for t, b in vocab.by_id.items()}
    walks = []
    for fn in ("cross_at", "cross_rows", "cross_list"):
        real = getattr(ebnf_walk.CrossingWalker, fn)
        monkeypatch.setattr(ebnf_walk.CrossingWalker, fn, lambda self, *a, _real=real, **k: walks.append(1) or _real(self, *a, **k))
    g = compiled.matcher()
    counts, computed = [], []
    for depth in range(20):
        for piece in opening:
            assert allowed_tokens(compiled, g.state) == brute_force_tokens(compiled, g.state, EOS), (name, depth, piece)
            assert g.accept_token(ids[piece]), (name, depth, piece)
        counts.append(len(walks))
        computed.append(len(compiled.masks._word_cache))  # (the masks computed: one per stand-in position)
    assert counts[9] > 0 and counts[-1] == counts[9], (name, counts)
    assert computed[-1] == computed[9], (name, computed)  # (every real position past it: a stand-in's mask, one copy)


def test_a_stand_in_answers_as_its_stack_or_raises(vocab):
    """top_frames keeps a stack's top states over a bottom frame: a stack of no more frames is
    itself; a stand-in's stand-in is itself; every terminal fed at the stand-in is accepted as at the
    stack (to the same top state) or raises BottomRead, which a stand-in of all its frames never does."""
    compiled = compile_grammar("ebnf", ARITH_GBNF, vocab)
    stacks = compiled.stacks
    g = compiled.matcher()
    ids = {b: t for t, b in vocab.by_id.items()}
    for piece in [b"(", b"(", b"1", b" +", b" (", b"(", b"2"]:
        assert g.accept_token(ids[piece])
    at = {c // compiled.n_lex for c in g.state}  # (inside "2"'s lexeme) and the stacks once a lexeme ends there
    sids = sorted(at | {stacks.feed(sid, t) for sid in at for t in range(len(compiled.terminal_names))} - {-1})
    raised = 0
    for sid in sids:
        frames = next(k for k in range(1, 257) if stacks.top_frames(sid, k) == sid)
        assert frames > 4  # (three parentheses deep)
        for k in range(1, frames):
            short = stacks.top_frames(sid, k)
            assert short != sid and stacks.top_frames(short, k) == short and stacks.top(short) == stacks.top(sid)
            for t in range(len(compiled.terminal_names) + 1):
                real = stacks.feed(sid, t)
                try:
                    got = stacks.feed(short, t)
                except BottomRead:
                    raised += 1
                    continue
                assert (got < 0) == (real < 0) and (real < 0 or stacks.top(got) == stacks.top(real)), (sid, k, t)
    assert raised > 0
