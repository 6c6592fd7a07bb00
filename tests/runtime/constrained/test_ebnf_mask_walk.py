"""The EBNF engine's fast masks (ebnf_masks.py: the per-lexer-state C scan of the token trie, the parser
consulted only for tokens that cross a lexeme end) allow exactly the tokens a brute-force walk of
each token through the parser allows, on random walks over several grammars and a vocabulary with
tokens spanning several terminals; the C scan equals the numpy scan, the C walk of crossing tokens
(ebnf_walk.py) the Python walk, the scan skipping subtrees of safe bytes (ebnf_scan.py) the plain
one; and without a compiler the masks are the same."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from loom.runtime.constrained import (
    TokenVocab,
    compile_grammar,
    ebnf,
    ebnf_masks,
    ebnf_scan,
    ebnf_walk,
    shared_scans,
    token_walk,
)
from loom.runtime.constrained.json_regex import DEFAULT_WHITESPACE
from loom.runtime.constrained.schema_grammar import schema_to_grammar

from grammars import ARITH_GBNF, JSON_GBNF, JSON_LARK, allowed_tokens, brute_force_tokens, random_walk, tiny_vocab

EOS = 0
KEYWORDS_LARK = r"""
start: stmt+
stmt: NAME "=" NUMBER ";" | "if" NAME ":" stmt
NAME: /[a-p]+/
NUMBER: /[0-9]+/
%ignore " "
"""
# A counted run (A) ends inside tokens, whose rest the next lexeme takes: B only up to 3 of A's
# bytes, C not digits (its safe bytes are fewer: it settles none of A's tokens).
RUNS_LARK = r"""
start: A B | A C
A: /[a-zA-Z0-9]{5}/
B: /[a-zA-Z0-9]{0,3}!/
C: /[a-zA-Z]{0,9}\?/
"""
# Ignored whitespace, and a terminal that starts with a space too: where Q may come, a run's split
# inside it is not redundant (ebnf_masks._run_ends keeps every split there).
SPACES_LARK = r"""
start: item+
item: NAME | Q | "{" start "}"
NAME: /[a-p]+/
Q: / q/
%import common.WS
%ignore WS
"""
SCHEMA = '{"type": "object", "properties": {"name": {"type": "string", "maxLength": 1200}, "tags": {"type": "array", "items": {"$ref": "#"}}}}'  # fmt: skip
# Tokens that close one lexeme and open the next (some more than once), or end one mid-token.
CROSSING = [b'"a":', b'],[', b'"},', b'"}]', b'1,"', b'":"', b'"}', b"}]", b'{"', b"a=1;", b"=12;if", b" if a", b"; ", b"12;x=", b'\\"', b'",', b"e+1", b"1.5]", b"abcde123", b"abcde1234", b"abcde1zzzz", b"abcdezzzzz",
            b"  \n  {", b"   q", b"\n\n  \"a", b"  1,", b"    ", b" \n ", b"\t\t}"]  # fmt: skip
GRAMMARS = {
    "json gbnf": ("ebnf", JSON_GBNF, None),
    "arith gbnf": ("ebnf", ARITH_GBNF, None),
    "json lark": ("lark", JSON_LARK, None),
    "keywords lark": ("lark", KEYWORDS_LARK, None),
    "runs lark": ("lark", RUNS_LARK, None),
    "spaces lark": ("lark", SPACES_LARK, None),
    "schema": ("lark", *schema_to_grammar(SCHEMA, DEFAULT_WHITESPACE, False)),
}


@pytest.fixture(scope="module")
def vocab() -> TokenVocab:
    """A small trained byte-level BPE vocabulary plus hand-made tokens that cross lexeme ends."""
    return tiny_vocab(CROSSING, EOS)


def _compile(name: str, vocab: TokenVocab):
    kind, source, dfas = GRAMMARS[name]
    return compile_grammar(kind, source, vocab, terminal_dfas=dfas) if dfas else compile_grammar(kind, source, vocab)


def _allowed(compiled, state) -> set[int]:
    return allowed_tokens(compiled, state)


def _brute(compiled, state) -> set[int]:
    return brute_force_tokens(compiled, state, EOS)


def _random_walk(compiled, seed: int, steps: int = 25) -> list[frozenset[int]]:
    """States along a random walk that prefers the crossing tokens (so lexemes end mid-token)."""
    return random_walk(compiled, seed, steps, set(range(1024, 1024 + len(CROSSING))), 0.5, EOS)


@pytest.mark.parametrize("walk", ["c", "c from words", "c rows at once", "python"])
@pytest.mark.parametrize("many", [ebnf_masks._MANY, 0], ids=["tokens walked", "lexer-state scans"])
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_masks_equal_a_brute_force_walk_of_every_token(vocab, name, many, walk, monkeypatch):
    """Every way of checking the tokens that cross a lexeme end (walked against the parser in C,
    from the split rows' token ids the scan recorded or from their packed words, or in Python, or
    by lexer-state scans entered mid-token, which many-token crossings take), a scan's split rows
    crossed one C call each or all in one (_cross_rows, as a scan of 8 or more rows is)."""
    monkeypatch.setattr(ebnf_masks, "_MANY", many)
    if walk == "c rows at once":
        monkeypatch.setattr(ebnf_masks, "_ONE_CALL_ROWS", 1)
    if walk == "c from words":
        monkeypatch.setattr(ebnf_scan, "PAIRS", 0)  # no scan records its rows' ids
        monkeypatch.setattr(shared_scans, "_KEPT", {})  # (nor finds another test's scans)
    if walk == "python":
        monkeypatch.setattr(ebnf_masks, "cross_walk_available", lambda: False)
    elif not ebnf_walk.available():
        pytest.skip("no C compiler: only the Python walk exists")
    compiled = _compile(name, vocab)
    for seed in range(3):
        for step, state in enumerate(_random_walk(compiled, seed)):
            fast, brute = _allowed(compiled, state), _brute(compiled, state)
            assert fast == brute, (name, seed, step, sorted(fast ^ brute)[:10])


@pytest.mark.skipif(not ebnf_scan.available(), reason="no C compiler: only the numpy scan exists")
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_the_c_scan_equals_the_numpy_scan_in_every_lexer_state(vocab, name, monkeypatch):
    walked_grammar = _compile(name, vocab)  # (held: the masks refer to their grammar weakly)
    walked = walked_grammar.masks
    monkeypatch.setattr(ebnf_masks, "lexeme_scan_available", lambda: False)
    scanned_grammar = _compile(name, vocab)
    scanned = scanned_grammar.masks
    trie = token_walk.token_trie(vocab)
    monkeypatch.setattr(shared_scans, "_KEPT", {})  # (the scans below are taken, not found)
    monkeypatch.setattr(ebnf_scan, "_MIN_RUN", 1)  # every run of safe bytes skipped, however short
    monkeypatch.setattr(ebnf_scan, "_MIN_SAFE_BYTES", 1)
    skipping = 0
    for lex in range(walked.g.boundary):
        walked.scan(lex)
        scanned.scan(lex)
        k = walked.g.lex_terminal[lex]  # the scan skipping subtrees of safe bytes, against the plain one
        dfa = walked.g.dfas[k]
        state = lex - walked.g.offsets[k]
        run = ebnf_scan.safe_run(dfa.table, dfa.accepting, state, trie.max_depth)
        for offset in (0, 1, 3) if run[1] else ():  # a run of 0: no byte is safe there
            skipping += 1
            (s_in, s_splits), (p_in, p_splits) = (
                ebnf_scan.lexeme_scan(trie, vocab, dfa.table, dfa.accepting, state, offset, run),
                ebnf_scan.lexeme_scan(trie, vocab, dfa.table, dfa.accepting, state, offset, ebnf_scan.NO_SKIP),
            )
            assert np.array_equal(s_in, p_in) and s_splits.keys() == p_splits.keys(), (name, lex, offset)
            assert all(np.array_equal(s_splits[j], p_splits[j]) for j in s_splits), (name, lex, offset)
        assert np.array_equal(walked._inside[lex], scanned._inside[lex]), (name, lex)
        assert walked._splits[lex].keys() == scanned._splits[lex].keys(), (name, lex)
        for j, enders in walked._splits[lex].items():
            assert np.array_equal(enders, scanned._splits[lex][j]), (name, lex, j)
        for offset in (1, 2, 3, trie.max_depth - 1):  # entered mid-token (from the trie level below it, not every node above)
            (w_in, w_splits), (s_in, s_splits) = walked.scan_at(lex, offset), scanned.scan_at(lex, offset)
            assert np.array_equal(w_in, s_in) and w_splits.keys() == s_splits.keys(), (name, lex, offset)
            assert all(np.array_equal(w_splits[j], s_splits[j]) for j in w_splits), (name, lex, offset)
    assert skipping, name


def test_masks_without_a_compiler_are_the_same(vocab, monkeypatch):
    fast = _compile("json lark", vocab)
    states = _random_walk(fast, 7)
    monkeypatch.setattr(ebnf_masks, "lexeme_scan_available", lambda: False)
    monkeypatch.setattr(ebnf_masks, "cross_walk_available", lambda: False)
    slow = _compile("json lark", vocab)
    for state in states:
        assert _allowed(fast, state) == _allowed(slow, state)


@pytest.mark.skipif(not ebnf_walk.available(), reason="no C compiler: the stacks are Python's")
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_the_c_stacks_are_the_python_stacks_and_fill_the_walk_s_rows(vocab, name, monkeypatch):
    """The LALR table and stack interning in C (lalr_native.py) give the stacks the Python lists
    give: every terminal fed at each stack breadth first (the end marker too) leads to stacks that
    pair one to one (ids are numbered as stacks are met, which differs), of the same startable
    terminals; and the rows the C walk filled itself (a mask's crossings) are what CompiledEbnf
    says of them."""
    native = _compile(name, vocab)
    monkeypatch.setattr(ebnf, "native_stacks", lambda *table: None)
    lists = _compile(name, vocab)
    assert native.stacks is not None and lists.stacks is None
    pair, todo = {0: 0}, [(0, 0)]
    while todo and len(pair) < 400:
        a, b = todo.pop(0)
        assert native.startable(a) == lists.startable(b) and native.stack_can_end(a) == lists.stack_can_end(b), (name, a, b)
        for t in range(len(native.terminal_names) + 1):
            after_a, after_b = native._feed(a, t), lists._feed(b, t)
            assert (after_a is None) == (after_b is None), (name, a, t)
            if after_a is not None and after_a not in pair:
                pair[after_a] = after_b
                todo.append((after_a, after_b))
            assert after_a is None or pair[after_a] == after_b, (name, a, t)
    assert len(set(pair.values())) == len(pair) > 1
    monkeypatch.undo()
    python_fills, fill = [], ebnf_walk.CrossingWalker._fill
    monkeypatch.setattr(ebnf_walk.CrossingWalker, "_fill", lambda self, sid: python_fills.append(sid) or fill(self, sid))
    walked = _compile(name, vocab)
    for seed in range(3):
        _random_walk(walked, seed)
    walker = walked.masks._walker
    assert walker is not None, name  # (every grammar here has tokens that cross a lexeme end)
    filled = np.flatnonzero(walker.row_off >= 0)
    assert len(filled) > len(python_fills)  # (Python fills a row where the arrays must grow first)
    for sid in filled.tolist():
        at, n = int(walker.row_off[sid]), int(walker.row_len[sid])
        row = walker.pairs[2 * at : 2 * (at + n)].reshape(-1, 2).tolist()
        assert row == [[t, walked.after(sid, t)] for t in walked.startable(sid)], (name, sid)


@pytest.mark.skipif(not ebnf_walk.available(), reason="no C compiler: only the Python walk exists")
@pytest.mark.parametrize("max_configs", [512, 1], ids=["all configurations", "truncated to 1"])
@pytest.mark.parametrize("name", sorted(GRAMMARS))
def test_the_c_crossing_walk_equals_the_python_walk(vocab, name, max_configs):
    """Random tokens entered at random offsets from the stacks a random walk reaches: the C walk
    accepts exactly the tokens the Python walk does, also where a position's configurations are
    truncated (MAX_CONFIGS), which must keep the same ones."""
    compiled = _compile(name, vocab)
    compiled.max_configs = max_configs
    compiled._step.clear(), compiled._step1.clear()  # the steps compiling took kept every configuration
    masks = compiled.masks
    walker = ebnf_walk.CrossingWalker(compiled)
    walker.scratch = np.zeros(1, dtype=np.int64)  # grown on demand: the walk resumes where it stopped
    walker.ctx.scratch, walker.ctx.scratch_cap = walker.scratch.ctypes.data, 1
    stacks = sorted({c // compiled.n_lex for state in _random_walk(compiled, 3) for c in state})
    rnd = random.Random(0)
    for _ in range(60):
        sid, offset = rnd.choice(stacks), rnd.choice([0, 0, 1, 2])
        pool = vocab.ids[vocab.lens > offset]
        ids = np.unique(np.array(rnd.sample(pool.tolist(), 40) + list(range(1024, 1024 + len(CROSSING))), dtype=np.int64))
        ids = ids[vocab.lens[np.searchsorted(vocab.ids, ids)] > offset]
        c_walk = set(walker.accepted(offset, sid, ids).tolist())
        c_ids = set(walker.accepted(offset, sid, ids, by_ids=True).tolist())
        py_walk = set(masks._accepted_from(offset, sid, ids).tolist())
        assert c_walk == py_walk == c_ids, (name, sid, offset, sorted(c_walk ^ py_walk)[:10], sorted(c_ids ^ py_walk)[:10])


@pytest.mark.skipif(not ebnf_scan.available(), reason="no C compiler: no scan lists or settles rows")
def test_a_long_string_s_masks_share_crossings_and_settle_safe_tails(vocab, monkeypatch):
    """Along a `maxLength: 1200` string (64-character chunk terminals), each position is a new
    lexer state. Its scans' rows of closing-quote tokens are the same from position to position,
    so what they let cross is looked up by their content; tokens whose bytes past a chunk's end are
    all string characters are settled without a walk (the next chunk takes them). The masks stay
    those of the brute-force walk."""
    compiled = _compile("schema", vocab)
    masks = compiled.masks
    shared, settled = [], []
    cross_splits, crossing = ebnf_masks.EbnfMasks._cross_splits, ebnf_masks.EbnfMasks._crossing

    def spy_splits(self, splits, sid, out):
        held = self._listed.get(id(splits))
        shared.append(held is not None and held[0] is splits and (held[1], sid) in self._across)
        cross_splits(self, splits, sid, out)

    def spy_crossing(self, offset, sid, enders, out):
        held = self._bulk.get(id(enders))
        settled.append(held is not None and held[0] is enders and self._safe_reach(sid, held[1]) > 0)
        crossing(self, offset, sid, enders, out)

    monkeypatch.setattr(ebnf_masks.EbnfMasks, "_cross_splits", spy_splits)
    monkeypatch.setattr(ebnf_masks.EbnfMasks, "_crossing", spy_crossing)
    single = {b[0]: t for t, b in vocab.by_id.items() if len(b) == 1}
    g = compiled.matcher()
    text = b'{"name":"' + bytes(b"abcdefghij"[k % 10] for k in range(150))
    for k, b in enumerate(text):
        assert g.accept_token(single[b])
        if k >= 8:
            assert _allowed(compiled, g.state) == _brute(compiled, g.state), k
    assert any(shared) and any(settled), (sum(shared), sum(settled))
    assert masks._across and masks._bulk


@pytest.mark.parametrize("name", ["json gbnf", "schema"])
def test_the_count_of_held_masks_is_kept_as_scans_add_them(vocab, monkeypatch, name):
    """count(), read before every new mask, is kept as scans add their rows, not recounted (at 128k
    tokens the recount cost ~100 us a mask): it equals a recount along walks, and once past the
    bound every cached mask goes."""
    compiled = _compile(name, vocab)
    m = compiled.masks

    def recount() -> int:
        return (len(m._inside) + sum(len(s) for s in m._splits.values()) + 2 * len(m._crossed) + 3 * len(m._shared_crossed)
                + sum(1 + len(s) for _, s in m._offset_scans.values()) + len(m._rests) + len(m._word_cache)
                + len(m._masks) + len(m._across) + len(m._across_shared) + len(m._bulk))  # fmt: skip

    for seed in range(3):
        for state in _random_walk(compiled, seed):
            _allowed(compiled, state)
            assert m.count() == recount() > 0
    monkeypatch.setattr(ebnf_masks, "MASK_CACHE_BYTES", 0)
    m._bound()
    assert m.count() == recount() == 0


# After "a" and after "b", x's WORD ends at stacks of one signature (";" or "q" may start; "q", a
# letter, keeps WORD's split rows whole: EbnfMasks._run_ends): what a token's rest does once that
# ";" is complete ("cat;;" against "cat;!") is not.
SIGNATURE_LARK = r"""
start: "a" x ";" ";" | "b" x ";" "!" | ("a" | "b") x "q"
x: WORD
WORD: /[a-z]+/
"""


@pytest.mark.skipif(not ebnf_walk.available(), reason="no C compiler: only the Python walk keeps verdicts per stack")
def test_stacks_of_one_signature_share_only_the_verdicts_of_shallow_walks(vocab):
    """A crossing's verdicts are kept per stack signature for tokens whose rest stays at the stack
    (reused at the next stack of that signature, unwalked), and per stack for the rest: a token
    that completes a lexeme and goes on read more of the stack, so at another stack it is walked
    again. Also for a string's closing-quote rows, crossed at objects of one shape at two depths."""
    tokens = [b"a", b"b", b";", b"!", b"cat", b"cat;", b"cat;;", b"cat;!", b"dog;;", b"dog;!", b"cats;"]
    small = TokenVocab.build({k + 1: b for k, b in enumerate(tokens)}, len(tokens) + 1, frozenset({EOS}))
    compiled = compile_grammar("lark", SIGNATURE_LARK, small)
    seen = []
    for first in (b"a", b"b"):
        g = compiled.matcher()
        assert g.accept_token(tokens.index(first) + 1)
        assert _allowed(compiled, g.state) == _brute(compiled, g.state), first
        seen.append({tokens[t - 1] for t in _allowed(compiled, g.state)})
    assert {b"cat;;", b"dog;;"} <= seen[0] and not {b"cat;!", b"dog;!"} & seen[0]
    assert {b"cat;!", b"dog;!"} <= seen[1] and not {b"cat;;", b"dog;;"} & seen[1]
    masks = compiled.masks
    assert len(masks._shared_crossed) < len(masks._crossed)  # the second stack's crossing found the first's verdicts

    compiled = _compile("schema", vocab)  # name strings closed inside a nested object, then at the top
    single = {b[0]: t for t, b in vocab.by_id.items() if len(b) == 1}
    g = compiled.matcher()
    for b in b'{"tags":[{"name":"ab"},{"name":"cd"}],"name":"ef"}':
        assert _allowed(compiled, g.state) == _brute(compiled, g.state), bytes([b])
        assert g.accept_token(single[b])
    assert any(held[1][2] for held in compiled.masks._across_shared.values())  # deep tokens kept apart
    assert len(compiled.masks._across_shared) < len([k for k in compiled.masks._across if isinstance(k[0], bytes | tuple)])


@pytest.mark.skipif(not ebnf_scan.available(), reason="no C compiler: no scan is kept")
def test_terminals_of_one_pattern_share_their_scans_across_grammars(vocab, monkeypatch):
    """A schema's objects each get their own `{` terminal, of one pattern, so one automaton: a
    lexer state's scan is kept by the automaton, and the second object's, or the next grammar's,
    is looked up, not scanned again. The masks stay the brute-force walk's."""
    from loom.runtime.constrained import ebnf

    monkeypatch.setattr(shared_scans, "_KEPT", {})
    monkeypatch.setattr(ebnf, "PRESCAN_SHARE", 0.0)  # (only the masks' own scans, whatever the compile's time)
    scans = []
    monkeypatch.setattr(ebnf_masks, "lexeme_scan", lambda *a, **k: scans.append(a[4:6]) or ebnf_scan.lexeme_scan(*a, **k))
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "object", "properties": {"d": {"type": "integer"}}}}}  # fmt: skip
    source, dfas = schema_to_grammar(json.dumps(schema), DEFAULT_WHITESPACE, False)
    counts = []
    for round_ in range(2):
        before = len(scans)
        compiled = compile_grammar("lark", source, vocab, terminal_dfas=dfas)
        braces = [k for k, name in enumerate(compiled.terminal_names) if name.startswith("LBRACE")]
        assert len(braces) == 3 and len({id(compiled.dfas[k]) for k in braces}) == 1
        single = {b[0]: t for t, b in vocab.by_id.items() if len(b) == 1}
        g = compiled.matcher()
        for b in b'{"a":{"b":1},"c":{"d":2}}':
            assert _allowed(compiled, g.state) == _brute(compiled, g.state), (round_, bytes([b]))
            assert g.accept_token(single[b])
        counts.append((len(compiled.masks._inside), sum(offset == 0 for _, offset in scans[before:])))
    (states, scanned), (states_again, scanned_again) = counts
    assert scanned < states  # the first grammar looked its other `{`s' scans up
    assert states_again == states and scanned_again == 0  # the second scanned nothing


@pytest.mark.skipif(not ebnf_scan.available(), reason="no C compiler: nothing is scanned ahead")
def test_compiling_scans_lexer_states_ahead_within_its_share_of_the_time(vocab, monkeypatch):
    """compile_grammar takes the lexer states' scans ahead on the compiling thread (start states,
    entered at a token's start and one byte in, then the states inside), for at most
    PRESCAN_SHARE of its own time (and PRESCAN_MAX_S): with time enough every state is done and a walk's masks scan
    nothing new; with none, only the first mask's states are."""
    from loom.runtime.constrained import ebnf

    monkeypatch.setattr(shared_scans, "_KEPT", {})
    monkeypatch.setattr(ebnf, "PRESCAN_SHARE", 0.0)
    lean_grammar = _compile("json lark", vocab)
    lean = lean_grammar.masks
    assert 0 < len(lean._inside) < lean.g.boundary
    monkeypatch.setattr(ebnf, "PRESCAN_SHARE", 1e9)
    monkeypatch.setattr(ebnf, "PRESCAN_MAX_S", 1e9)
    compiled = _compile("json lark", vocab)
    masks = compiled.masks
    assert len(masks._inside) == masks.g.boundary
    assert all((masks.g.offsets[t], 1) in masks._offset_scans for t in range(len(masks.g.dfas)))
    scans = []
    monkeypatch.setattr(ebnf_masks, "lexeme_scan", lambda *a, **k: scans.append(a[5]) or ebnf_scan.lexeme_scan(*a, **k))
    for state in _random_walk(compiled, 5):
        assert _allowed(compiled, state) == _brute(compiled, state)
    assert all(offset > 1 for offset in scans), scans


def test_the_shared_scans_stay_within_their_bytes_counting_the_automata_they_hold(vocab, monkeypatch):
    """An entry holds its automaton (its key is the automaton's identity), so a large one counts in
    its size: what the cache keeps alive stays within SHARED_SCAN_BYTES, the least recently used
    going first."""
    from loom.runtime.constrained.dfa import ByteDFA

    monkeypatch.setattr(shared_scans, "_KEPT", {})
    trie = token_walk.token_trie(vocab)
    big = ByteDFA(np.zeros((2000, 256), dtype=np.int32), np.zeros(2000, dtype=bool))
    monkeypatch.setattr(shared_scans, "SHARED_SCAN_BYTES", 5 * big.table.nbytes)
    for state in range(10):
        shared_scans.keep_scan(trie, big, state, 0, (np.zeros(trie.width, dtype=np.uint32), {}), {}, {})
    kept = shared_scans._KEPT[id(trie)]
    assert len(kept.scans) == 4 and kept.nbytes <= shared_scans.SHARED_SCAN_BYTES
    assert shared_scans.shared_scan(trie, big, 9, 0) is not None and shared_scans.shared_scan(trie, big, 5, 0) is None


def test_a_dropped_grammar_is_freed_at_once_not_by_the_cyclic_collector(vocab):
    """A compiled grammar holds its masks and they refer back to it weakly: dropping the last
    reference frees it then and there, not in a full collection's pause (tens of ms for a large
    schema's ~40k objects) on whatever thread that runs."""
    import gc
    import weakref

    compiled = _compile("schema", vocab)
    for state in _random_walk(compiled, 1, steps=10):
        _allowed(compiled, state)
    assert compiled.masks._walker is not None or not ebnf_walk.available()  # (the crossing walker refers to the grammar too)
    gone = weakref.ref(compiled)
    gc.disable()
    try:
        del compiled
        assert gone() is None
    finally:
        gc.enable()
