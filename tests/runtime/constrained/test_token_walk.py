"""The C trie walk that computes regex masks (runtime/constrained/token_walk.py) allows exactly the
tokens the numpy scan allows, on hand-made and trained vocabularies, and the numpy scan takes over
where no compiler is at hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.constrained import TokenVocab, token_bytes, token_walk
from loom.runtime.constrained.regex_dfa import CompiledRegex
from loom.runtime.constrained.schema import schema_to_regex

from grammars import PERSON_SCHEMA

pytestmark = pytest.mark.skipif(not token_walk.available(), reason="no C compiler: the numpy scan is used")


@pytest.fixture(autouse=True, params=["default", "every state"])
def safe_sets(request, monkeypatch):
    """Each test twice: as shipped (states with few live bytes walk plainly), and with the safe set
    looked for in every state, so small vocabularies' counted runs take the skip too."""
    if request.param == "every state":
        monkeypatch.setattr(token_walk, "_MIN_SAFE_BYTES", 1)


# Prefixes of one another, the same bytes under two ids, a token past vocab_size, multi-byte UTF-8.
HAND = {1: b"a", 2: b"ab", 3: b"abc", 4: b"abd", 5: b"b", 6: b"ab", 7: b'"', 8: b'",', 9: "é".encode(), 10: b"\xc3", 11: b"1",
        12: b"12", 13: b"}", 40: b"zz"}  # fmt: skip


def test_the_trie_holds_every_token_once_in_preorder():
    vocab = TokenVocab.build(HAND, 32, frozenset({0}))
    trie = token_walk.token_trie(vocab)
    assert sorted(trie.tok_ids.tolist()) == sorted(vocab.by_id)  # 40 is past vocab_size: not a token
    spelled = {}
    path: list[int] = []
    for i, (b, d) in enumerate(zip(trie.node_byte.tolist(), trie.node_depth.tolist())):
        path[d - 1 :] = [b]
        for t in trie.tok_ids[trie.tok_off[i] : trie.tok_off[i + 1]].tolist():
            spelled[t] = bytes(path)
        end = int(trie.node_skip[i])
        assert all(trie.node_depth[j] > d for j in range(i + 1, end)) and (end == len(trie.node_depth) or trie.node_depth[end] <= d)
    assert spelled == vocab.by_id
    # Each node's subtree summary holds the buckets of its own and every descendant's byte; each
    # token's, the buckets of its bytes (what the walk's skip of all-safe subtrees relies on).
    bit, flags = token_walk.BUCKET_BIT, np.uint64(token_walk.ILL_FORMED | token_walk.C1_CONTROL)
    for i in range(len(trie.node_byte)):
        below = trie.node_byte[i : int(trie.node_skip[i])]
        assert trie.node_sub[i] & ~flags == np.bitwise_or.reduce(bit[below])
    for t, data in vocab.by_id.items():
        assert trie.tok_buckets[t] & ~flags == np.bitwise_or.reduce(bit[list(data)])


def both(compiled: CompiledRegex) -> None:
    for state in range(compiled.dead + 1):
        walked = compiled._scan(state)
        scanned = compiled._scan_numpy(state)
        assert np.array_equal(walked, scanned), f"state {state} of {compiled.regex!r}"


# Strings, letters and digits loop on most buckets, and counted runs of them ({3}) stay live for a
# few bytes, so whole subtrees are taken from the safe mask.
@pytest.mark.parametrize(
    "regex",
    [
        r"ab?c*",
        r'"(?:[^"\\]|\\.)*",?',
        r"(é|1)+2?\}",
        r"[a-z]{2,5}",
        r"x",
        r"[a-c]*d",
        r"[^a]*a",
        r"[\x00-\xff]*",
        r"[a-f0-9]{3}\}",
        r"[a-z]{2}[a-z]*",
        r"(?:ab){1,3}",
    ],
)
def test_walk_equals_the_numpy_scan_on_a_hand_made_vocabulary(regex):
    both(CompiledRegex(regex, TokenVocab.build(HAND, 32, frozenset({0}))))


# UTF-8 of every kind: characters of 2, 3 and 4 bytes, C1 controls (U+0080-U+009F), the starts of
# characters, and bytes that are no UTF-8 (stray continuation bytes, overlong forms, a surrogate,
# past U+10FFFF, a lead byte cut short by ASCII), alone and beside quotes and backslashes.
UTF8 = {i + 1: data for i, data in enumerate([
    b"a", b"ab", b'"', b'",', b"\\", b"\\n", "é".encode(), "中".encode(), "😀".encode(), "\u0085".encode(), "\u009f".encode(),
    "\u00a0".encode(), b"\xc3", b"\xc2", b"\xe4\xb8", b"\xf0\x9f\x98", b"\x80", b"\xbf\x80", b"\xc0\xaf", b"\xe0\x80\x80",
    b"\xed\xa0\x80", b"\xf4\x90\x80\x80", "\U0010ffff".encode(), b"\xf5\x80\x80\x80", b"\xe4a", b"a\xff", "aé中".encode(),
    'é"'.encode(), '"é'.encode(), "\u0085a".encode(), "a\u0085".encode(), "é\\n中".encode(), b"\xc3\xa9\xc3"])}  # fmt: skip
JSON_STRINGS = [r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"',  # Loom's grammars'
                r'"([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])*"']  # outlines' schema regexes' (no C1 controls)


def _well_formed_prefix(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data"
    return True


def test_the_trie_flags_what_is_not_utf_8_and_the_c1_controls():
    vocab = TokenVocab.build(UTF8, 64, frozenset({0}))
    trie = token_walk.token_trie(vocab)
    for t, data in vocab.by_id.items():
        ill, c1 = bool(trie.tok_buckets[t] & np.uint64(token_walk.ILL_FORMED)), bool(trie.tok_buckets[t] & np.uint64(token_walk.C1_CONTROL))
        assert ill == (not _well_formed_prefix(data)), data
        if not ill:
            assert c1 == any(0x80 <= ord(c) <= 0x9F for c in data.decode("utf-8", "ignore")), data


@pytest.mark.parametrize(
    "regex", [*JSON_STRINGS, r'"[^"]*"', r"[^a]*", r'"[^"é]*"', r"[^中]*", r"[^😀]*", r'"[^"\\\x00-\x1f]{0,3}"', r"(?:é|中|a)*x", r"[\x00-\xff]*"]
)
def test_walk_equals_the_numpy_scan_on_utf_8_of_every_kind(regex):
    both(CompiledRegex(regex, TokenVocab.build(UTF8, 64, frozenset({0}))))


@pytest.mark.parametrize("regex", JSON_STRINGS)
def test_a_json_string_s_walk_takes_its_characters_from_the_safe_mask(regex):
    """Inside a JSON string every well-formed character loops, so the unsafe set names what is not
    UTF-8 (and the C1 controls, where the string leaves them out) instead of the multi-byte bytes:
    their tokens are skipped like ASCII ones."""
    compiled = CompiledRegex(regex, TokenVocab.build(UTF8, 64, frozenset({0})))
    inside = int(compiled.table[compiled.initial_state][compiled.byte_class[ord('"')]])
    unsafe, run, _, _ = token_walk._safe_run(compiled.table, compiled.byte_class, compiled.dead, inside, 99)
    assert run == 99 and unsafe & token_walk.ILL_FORMED and not unsafe & token_walk.HI_BUCKETS
    assert bool(unsafe & token_walk.C1_CONTROL) == ("x9F" in regex)


@pytest.fixture(scope="module")
def trained_vocab():
    from loom.tiny_tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(2048)

    class HFLike:
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {0: None, 1: None, 2: None}

        def get_vocab(self) -> dict[str, int]:
            return tok.get_vocab(with_added_tokens=True)

    return TokenVocab.build(token_bytes(HFLike()), 2048, frozenset({0}))


def test_safe_masks_derived_from_a_nearby_run_equal_the_direct_ones(trained_vocab):
    """A counted run asks for run after run of one safe set: each mask, built from the nearest cached
    run (tokens of the lengths between set or cleared), holds exactly the tokens of at most `run`
    bytes with no byte in the unsafe buckets."""
    trie = token_walk.token_trie(trained_vocab)
    trie.safe_masks.clear()
    some = int(token_walk.BUCKET_BIT[ord('"')] | token_walk.BUCKET_BIT[ord("\\")] | token_walk.BUCKET_BIT[0x80])
    for unsafe in (some, 0):  # (none unsafe: the trie's kept masks by length)
        for run in [12, 11, 9, 10, 14, 2, 1, 0, 30, trie.max_depth + 5, trie.max_depth + 9, trie.max_depth, 13]:
            allowed = [t for t, data in trained_vocab.by_id.items() if len(data) <= run and not (trie.tok_buckets[t] & np.uint64(unsafe))]
            words = token_walk.safe_mask(trie, unsafe, run)
            bits = np.unpackbits(words.view(np.uint8), bitorder="little")
            assert np.flatnonzero(bits).tolist() == sorted(allowed), (unsafe, run)


def test_last_unsafe_byte_is_where_each_token_s_last_unsafe_byte_is(trained_vocab):
    trie = token_walk.token_trie(trained_vocab)
    bit = token_walk.BUCKET_BIT
    for unsafe in (int(bit[ord('"')] | bit[ord("\\")] | bit[0x80] | bit[0xC3]), int(bit[ord("e")] | bit[ord(" ")])):
        last = token_walk.last_unsafe_byte(trie, unsafe)
        for t, data in trained_vocab.by_id.items():
            positions = [p + 1 for p, b in enumerate(data) if bit[b] & np.uint64(unsafe)]
            assert last[t] == (positions[-1] if positions else 0), (t, data)


def test_walk_equals_the_numpy_scan_on_a_schema(trained_vocab):
    both(CompiledRegex(schema_to_regex(json.dumps(PERSON_SCHEMA)), trained_vocab))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.sampled_from(
            [r"[a-z]+", r"\d{1,3}", r"(?:foo|bar)", r" ?", r"[^x]", r"\.", r"é*", r'"[^"]{0,4}"', r'"[^"\\]*"', r"[ -~]*", r"[a-f0-9]{6}"]
        ),
        min_size=1,
        max_size=4,
    )
)
def test_walk_equals_the_numpy_scan_on_random_regexes(trained_vocab, parts):
    both(CompiledRegex("".join(parts), trained_vocab))


def test_without_a_compiler_the_numpy_scan_gives_the_same_masks(monkeypatch, trained_vocab):
    regex = schema_to_regex(json.dumps(PERSON_SCHEMA))
    walked = CompiledRegex(regex, trained_vocab)
    monkeypatch.setattr(token_walk, "_library", lambda: None)
    scanned = CompiledRegex(regex, trained_vocab)
    assert scanned._trie is None and walked._trie is not None
    for state in range(walked.dead):
        assert walked.mask(state)[0].tolist() == scanned.mask(state)[0].tolist()


# ----------------------------------------------------------------------------- DFAs built as walks reach them


def lockstep(eager: CompiledRegex, lazy: CompiledRegex, vocab: TokenVocab, seed: int, steps: int = 80) -> bytes:
    """A random walk taken in both at once: the same mask, forced bytes and end at every step."""
    rng = np.random.default_rng(seed)
    a, b = eager.matcher(), lazy.matcher()
    out = bytearray()
    for _ in range(steps):
        ma, mb = a.compiled.mask(a.state), b.compiled.mask(b.state)
        assert ma[0].tolist() == mb[0].tolist() and ma[1] == mb[1], bytes(out)
        assert a.forced_bytes() == b.forced_bytes() and a.is_terminated() == b.is_terminated()
        ids = np.flatnonzero(np.unpackbits(ma[0].numpy().view(np.uint8), bitorder="little"))
        ids = [int(t) for t in ids if t not in vocab.eos_token_ids]
        if not ids or a.is_terminated():
            break
        token = ids[rng.integers(len(ids))]
        assert a.accept_token(token) and b.accept_token(token)
        out += vocab.by_id[token]
    return bytes(out)


@pytest.mark.parametrize("regex", [r'"(?:[^"\\]|\\.){0,40}"', r"(?:[a-z]{1,3}[0-9]?){1,12}", None])
def test_a_lazy_dfa_gives_the_eager_masks_at_every_step(monkeypatch, trained_vocab, regex):
    from loom.runtime.constrained import regex_dfa

    regex = regex or schema_to_regex(json.dumps(PERSON_SCHEMA))
    eager = CompiledRegex(regex, trained_vocab)
    monkeypatch.setattr(regex_dfa, "EAGER_BUDGET_S", 0.0)
    lazy = CompiledRegex(regex, trained_vocab, lazy=True)
    assert lazy._lazy is not None and lazy.num_states < eager.num_states  # only what the start's mask reached
    for seed in range(6):
        lockstep(eager, lazy, trained_vocab, seed)


@pytest.mark.parametrize("regex", JSON_STRINGS)
def test_a_lazy_dfa_builds_the_utf_8_states_a_string_s_search_reads(monkeypatch, regex):
    """The search for a string's safe set reads the rows of its UTF-8 states, built on demand (by
    the C step from inside the search and the walk, the arrays growing between calls): the masks
    equal the eager DFA's along random walks."""
    from loom.runtime.constrained import regex_dfa

    vocab = TokenVocab.build(UTF8, 64, frozenset({0}))
    eager = CompiledRegex(regex, vocab)
    monkeypatch.setattr(regex_dfa, "EAGER_BUDGET_S", 0.0)
    lazy = CompiledRegex(regex, vocab, lazy=True)
    for seed in range(8):
        lockstep(eager, lazy, vocab, seed)


def test_a_lazy_dfa_past_its_state_bound_narrows_and_stays_sound(monkeypatch, trained_vocab):
    import re

    from loom.runtime.constrained import regex_dfa

    monkeypatch.setattr(regex_dfa, "EAGER_BUDGET_S", 0.0)
    regex = r"(?:[a-c][0-9]){1,30}"
    lazy = CompiledRegex(regex, trained_vocab, lazy=True, max_states=12)
    for seed in range(10):
        g, out, rng = lazy.matcher(), bytearray(), np.random.default_rng(seed)
        for _ in range(40):
            mask = np.unpackbits(lazy.mask(g.state)[0].numpy().view(np.uint8), bitorder="little")
            ids = [int(t) for t in np.flatnonzero(mask) if t not in trained_vocab.eos_token_ids]
            if not ids:
                break
            token = ids[rng.integers(len(ids))]
            assert g.accept_token(token)
            out += trained_vocab.by_id[token]
            assert re.fullmatch(r"(?:[a-c][0-9]){0,30}[a-c]?", out.decode()), out  # never a wrong byte
        assert lazy.num_states <= 12
