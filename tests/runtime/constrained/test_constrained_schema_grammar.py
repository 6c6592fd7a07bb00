"""JSON Schemas the regex path refuses, compiled to a grammar for the EBNF engine (schema_grammar.py):
recursive $refs, large objects with many optional properties, open objects, long strings; what a
user notices is that the backend compiles them, valid JSON is accepted and invalid JSON rejected,
and text sampled under the masks validates."""

from __future__ import annotations

import json
import random
import re
import time

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.constrained import (
    GrammarBackend,
    GrammarError,
    TokenVocab,
    allocate_token_bitmask,
    apply_token_bitmask_,
    compile_grammar,
    subset_native,
    token_bytes,
    unpack_bitmask,
)
from loom.runtime.constrained.dfa import minimal_dfa, terminal_dfa, words_dfa
from loom.runtime.constrained.ebnf import CompiledEbnf
from loom.runtime.constrained.schema_automata import STRING_CHAR, counted_string_dfa, product
from loom.runtime.constrained.schema_grammar import schema_to_grammar
from loom.tiny_tokenizer import tiny_tokenizer

from reference_dfa import regex_to_dfa  # tests/support: the 256-column construction, as a reference

EOS = 0
BYTES = {b + 1: bytes([b]) for b in range(256)}  # one token per byte: any text can be fed

TREE = {
    "$defs": {"node": {"type": "object", "properties": {"value": {"type": "integer"},
                                                         "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
                       "required": ["value"], "additionalProperties": False}},
    "$ref": "#/$defs/node",
}  # fmt: skip
LINKED = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
    "required": ["name", "next"],
    "additionalProperties": False,
}
WIDE = {
    "type": "object",
    "properties": {f"p{i}": ({"type": "integer", "minimum": 0, "maximum": 99} if i % 3 else {"type": "string", "maxLength": 5})
                   for i in range(60)},
    "required": ["p10", "p50"],
}  # fmt: skip


@pytest.fixture(scope="module")
def byte_vocab() -> TokenVocab:
    return TokenVocab.build(BYTES, 258, frozenset({EOS}))


@pytest.fixture(scope="module")
def real() -> tuple[TokenVocab, object]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(2048), eos_token="<|endoftext|>")
    return TokenVocab.build(token_bytes(tok), 2048, frozenset({EOS})), tok


def grammar(vocab: TokenVocab, schema, open_objects: bool = False) -> CompiledEbnf:
    source, dfas = schema_to_grammar(json.dumps(schema), open_objects=open_objects)
    return compile_grammar("lark", source, vocab, terminal_dfas=dfas)


def accepts(compiled: CompiledEbnf, text: str) -> bool:
    g = compiled.matcher()
    return all(g.accept_token(b + 1) for b in text.encode()) and g.accept_token(EOS)


def accepts_tokens(compiled: CompiledEbnf, tok, text: str) -> bool:
    g = compiled.matcher()
    return all(g.accept_token(t) for t in tok(text, add_special_tokens=False)["input_ids"]) and g.accept_token(EOS)


def test_recursive_tree_accepts_nested_and_rejects_invalid(byte_vocab):
    c = grammar(byte_vocab, TREE)
    assert accepts(c, '{"value":1}')
    assert accepts(c, '{"value":1,"children":[{"value":2},{"value":3,"children":[{"value":4,"children":[]}]}]}')
    assert accepts(c, '{ "value": 1, "children": [ { "value": -2 } ] }')
    assert not accepts(c, '{"children":[]}')  # value required
    assert not accepts(c, '{"value":1,"children":[{"value":"x"}]}')  # wrong type, deep
    assert not accepts(c, '{"value":1,"children":[{"value":2,"extra":0}]}')  # closed
    assert not accepts(c, '{"value":1,"children":[{"value":2}]')  # unbalanced


def test_backend_falls_back_to_the_grammar_for_recursion(real):
    vocab, tok = real
    backend = GrammarBackend(vocab.by_id, vocab.vocab_size, vocab.eos_token_ids)
    compiled = backend.compile("json_schema", json.dumps(LINKED)).result(timeout=60)
    assert isinstance(compiled, CompiledEbnf)
    assert accepts_tokens(compiled, tok, '{"name":"a","next":{"name":"b","next":{"name":"c","next":null}}}')
    assert not accepts_tokens(compiled, tok, '{"name":"a","next":{"name":"too long a name","next":null}}')
    assert not accepts_tokens(compiled, tok, '{"name":"a","next":{"name":"b"}}')
    backend.shutdown()


def test_refusals_name_both_paths_and_the_keyword():
    backend = GrammarBackend(BYTES, 258, frozenset({EOS}))
    schema = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    with pytest.raises(GrammarError, match="uniqueItems.*as a grammar.*uniqueItems"):
        backend._compile("json_schema", json.dumps(schema))
    with pytest.raises(GrammarError, match="'not'"):
        schema_to_grammar(json.dumps({"$defs": {"n": {"not": {"const": 1}, "items": {"$ref": "#/$defs/n"}}}, "$ref": "#/$defs/n"}))
    backend.shutdown()


def test_sixty_optional_properties_compile_and_validate(byte_vocab):
    t0 = time.monotonic()
    c = grammar(byte_vocab, WIDE)
    assert time.monotonic() - t0 < 20
    assert accepts(c, '{"p10":1,"p50":2}')
    assert accepts(c, '{"p0":"abc","p1":5,"p10":1,"p33":"","p50":2,"p59":7}')
    assert accepts(c, '{"p59":1,"p10":1,"p3":"b","p1":5,"p50":2,"p0":""}')  # optional members in any order
    assert not accepts(c, '{"p50":2,"p10":1}')  # required ones in declared order
    assert not accepts(c, '{"p10":1}')  # p50 required
    assert not accepts(c, '{"p10":100,"p50":2}')  # out of range
    assert not accepts(c, '{"p0":"abcdef","p10":1,"p50":2}')  # too long
    assert not accepts(c, '{"p10":1,"p50":2,"zz":1}')  # closed by default (as schema_to_regex)
    assert not accepts(c, '{"p10":1,"p10":1,"p50":2}')  # no repeated key


def test_open_objects_admit_undeclared_keys_only(byte_vocab):
    c = grammar(byte_vocab, WIDE, open_objects=True)
    assert accepts(c, '{"zz":{"a":[1,null]},"p10":1,"q":"x","p50":2,"r":true}')
    assert not accepts(c, '{"p10":1,"p50":2,"p51":"not an integer"}')  # a declared key is not "undeclared"
    assert accepts(c, '{"p10":1,"p50":2,"Vendor\\\\Ns\\\\":"x","q\\n":0}')  # escaped keys no declared name can be
    assert not accepts(c, '{"p10":1,"p50":2,"p\\u0035":"x"}')  # "p5" spelled with an escape is no undeclared key
    typed = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": {"type": "integer"}}
    c = grammar(byte_vocab, typed)
    assert accepts(c, '{"a":"x","b":1,"c":2}')
    assert not accepts(c, '{"a":"x","b":"y"}')


def test_long_max_length_string(byte_vocab):
    c = grammar(byte_vocab, {"type": "object", "properties": {"s": {"type": "string", "minLength": 3, "maxLength": 3000}},
                             "required": ["s"]})  # fmt: skip
    for n, ok in [(0, False), (2, False), (3, True), (64, True), (65, True), (1000, True), (2999, True), (3000, True), (3001, False)]:
        assert accepts(c, json.dumps({"s": "é" * n}, ensure_ascii=False)) == ok, n
    assert accepts(c, json.dumps({"s": '"\\' * 1500}))  # escapes count as one character each
    for lo, hi in [(100, None), (64, None), (130, 200), (0, 65)]:  # every chunk boundary, with and without a maximum
        c = grammar(byte_vocab, {"type": "string", "minLength": lo, **({} if hi is None else {"maxLength": hi})})
        for n in sorted({0, 1, 63, 64, 65, 99, 100, 101, 127, 128, 129, 130, 199, 200, 201, 300}):
            assert accepts(c, json.dumps("a" * n)) == (n >= lo and (hi is None or n <= hi)), (lo, hi, n)


def test_formats_beside_lengths_and_dates(byte_vocab):
    c = grammar(byte_vocab, {"type": "array", "items": {"type": "string", "format": "date"}, "maxItems": 2})
    assert accepts(c, '["2020-02-29","2021-12-31"]')
    assert not accepts(c, '["2021-02-29"]') and not accepts(c, '["2020-04-31"]')
    assert not accepts(c, '["a","b","c"]')
    c = grammar(byte_vocab, {"type": "string", "format": "date-time"})
    assert accepts(c, '"2022-01-01T12:00:00Z"') and accepts(c, '"2022-01-01T12:00:00.5+01:00"')
    assert not accepts(c, '"2022-01-01T12:00:00"')
    c = grammar(byte_vocab, {"type": "string", "pattern": "^[a-z]+$", "minLength": 3, "maxLength": 5})  # both enforced
    assert [accepts(c, json.dumps(x)) for x in ["ab", "abc", "abcde", "abcdef", "ab1"]] == [False, True, True, False, False]
    c = grammar(byte_vocab, {"type": "string", "format": "email", "maxLength": 20})
    assert accepts(c, '"a@b.co"') and not accepts(c, '"nope"') and not accepts(c, json.dumps("a" * 20 + "@b.co"))
    with pytest.raises(GrammarError, match="format"):
        schema_to_grammar(json.dumps({"type": "string", "format": "email", "maxLength": 5000}))


PATTERNED = {
    "type": "object",
    "properties": {"name": {"type": "string"}},
    "patternProperties": {"^x-": {"type": "integer"}, "^/[^/]+$": {"type": "string", "pattern": "^([a-z]:)?/[^/]*$"},
                          "^n": {"maxLength": 3}},
}  # fmt: skip


@pytest.mark.parametrize("open_objects", [False, True])
def test_pattern_properties(byte_vocab, open_objects):
    c = grammar(byte_vocab, PATTERNED, open_objects)
    assert accepts(c, '{"name":"abc","x-1":2,"/a":"c:/d"}')
    assert accepts(c, '{"x-1":2,"name":"a","x-2":-3}')  # pattern members anywhere, declared ones in order
    assert not accepts(c, '{"x-1":"two"}')  # a matching key takes its pattern's schema
    assert not accepts(c, '{"/a":"no-slash"}')
    assert accepts(c, '{"/a/b":"/c"}') == open_objects  # "/a/b" matches no pattern
    assert not accepts(c, '{"name":"abcd"}')  # a declared name matching a pattern takes both schemas
    assert accepts(c, '{"other":[1,{"a":null}]}') == open_objects  # matching no pattern: additionalProperties
    assert not accepts(c, '{"x-other":[1]}')
    with pytest.raises(GrammarError, match="overlap"):
        schema_to_grammar(json.dumps({"patternProperties": {"^a": {}, "b$": {"type": "integer"}}}))


@pytest.mark.parametrize("native", [True, False], ids=["C subset step", "Python subset construction"])
def test_terminal_dfa_equals_regex_to_dfa(native, monkeypatch):
    from loom.runtime.constrained import dfa as dfa_module

    compiled = dfa_module.native_subsets_available()
    monkeypatch.setattr(dfa_module, "native_subsets_available", lambda: native and compiled)
    monkeypatch.setattr(dfa_module, "_terminals", type(dfa_module._terminals)())  # nothing cached
    for pattern in [r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4}){0,20}"', r"(?:ab|a)*c", r"é+|ü", r"x[^\n]{2,5}"]:
        a, b = regex_to_dfa(pattern, "t"), terminal_dfa(pattern, "t")
        assert a.table.shape == b.table.shape and (a.table == b.table).all() and (a.accepting == b.accepting).all()


@pytest.mark.skipif(not subset_native.available(), reason="no C compiler: only the numpy rounds")
def test_the_c_moore_refinement_gives_the_numpy_rounds_partition():
    """subset_native.moore and dfa._moore_rounds put the same states together, on random tables."""
    from loom.runtime.constrained import dfa as dfa_module

    rng = np.random.default_rng(0)
    for _ in range(200):
        n, c = int(rng.integers(1, 60)), int(rng.integers(1, 6))
        table = rng.integers(0, n, size=(n, c)).astype(np.int32)
        classes = rng.integers(0, 3, size=n).astype(np.int64)
        a, b = subset_native.moore(table, classes), dfa_module._moore_rounds(table, classes)
        assert ((a[:, None] == a[None, :]) == (b[:, None] == b[None, :])).all()
        assert (a[:, None] == a[None, :])[classes[:, None] != classes[None, :]].sum() == 0  # (a refinement)


def _isomorphic(a, b) -> bool:
    """Two DFAs walked together from their starts: each state pairs with one state, of the same acceptance."""
    if a.table.shape != b.table.shape:
        return False
    pair, todo = {0: 0}, [0]
    while todo:
        p = todo.pop()
        if a.accepting[p] != b.accepting[pair[p]]:
            return False
        for x, y in zip(a.table[p].tolist(), b.table[pair[p]].tolist()):
            if x not in pair:
                pair[x] = y
                todo.append(x)
            elif pair[x] != y:
                return False
    return len(set(pair.values())) == len(pair)


def test_counted_strings_are_the_regex_s_minimal_automaton():
    # Built as a chain of one character's automaton (ms), they equal the subset construction's
    # (~200 ms for 64 characters): a terminal of a maxLength string no longer costs a first request that.
    for lo, hi in [(0, 5), (2, 7), (3, None), (1, None), (0, None), (4, 4), (0, 64), (64, None)]:
        for open_quote, close_quote in [(True, True), (False, True), (False, False)]:
            body = f"{STRING_CHAR}{{{lo},{'' if hi is None else hi}}}"
            regex = ('"' if open_quote else "") + body + ('"' if close_quote else "")
            assert _isomorphic(terminal_dfa(regex, "t"), counted_string_dfa(lo, hi, open_quote, close_quote)), regex


def _pairwise_product(a, b, keep_b):
    """The product automaton built a pair at a time (as schema_automata.product did before it went a layer at a
    time), live states kept, minimised."""
    nb = b.table.shape[0]
    index, order, rows = {(0, 0): 0}, [(0, 0)], []
    while len(rows) < len(order):
        p, q = order[len(rows)]
        uniq, inv = np.unique(a.table[p].astype(np.int64) * nb + b.table[q], return_inverse=True)
        ids = []
        for k in uniq.tolist():
            if divmod(k, nb) not in index:
                index[divmod(k, nb)] = len(order)
                order.append(divmod(k, nb))
            ids.append(index[divmod(k, nb)])
        rows.append(np.asarray(ids, dtype=np.int64)[inv.reshape(-1)])
    table = np.stack(rows)
    accepting = np.array([bool(a.accepting[p]) and bool(b.accepting[q]) == keep_b for p, q in order])
    live = accepting.copy()
    for _ in range(len(order)):
        live = live | live[table].any(axis=1)
    if not live[0]:
        return None
    keep = np.flatnonzero(live)
    new_of = np.full(len(order), len(keep), dtype=np.int64)
    new_of[keep] = np.arange(len(keep))
    full = np.vstack([new_of[table[keep]], np.full((1, 256), len(keep), dtype=np.int64)])
    return minimal_dfa(full, np.append(accepting[keep], False), np.arange(256))


def test_an_object_s_declared_keys_automaton_is_the_regex_s():
    # words_dfa (a trie, minimised) against the subset construction of the escaped alternation
    rnd = random.Random(0)
    for _ in range(20):
        names = sorted({"".join(rnd.choice('abé"\\x_') for _ in range(rnd.randint(0, 6))) for _ in range(rnd.randint(1, 12))})
        regex = "|".join(re.escape(json.dumps(n, ensure_ascii=False)) for n in names)
        assert _isomorphic(terminal_dfa(regex, "t"), words_dfa([json.dumps(n, ensure_ascii=False).encode() for n in names])), names


def test_product_automata_equal_the_pair_at_a_time_construction():
    dfas = [terminal_dfa(r, "t") for r in (r'"[a-z]{2,5}"', r'"(ab|cd)+x?"', r'"[a-z_]*"', r'"(?:title|name)_[a-z]{2,3}(-[A-Z]{2})?"')]
    dfas.append(words_dfa([b'"name_en"', b'"title_fr-FR"', b'"ab"']))
    for a in dfas:
        for b in dfas:
            for keep_b in (True, False):
                want, got = _pairwise_product(a, b, keep_b), product(a, b, keep_b)
                if want is None:
                    assert got.dead == 0
                else:
                    assert (got.table == want.table).all() and (got.accepting == want.accepting).all()


SCHEMAS = {"tree": TREE, "linked": LINKED, "wide": WIDE}
# Where random tokens would almost never spell the required keys (WIDE's open object takes any
# key), a sample starts from a prefix holding them, then goes on at random.
PREFIXES = {"wide": '{"p10": 5, "p50": 7'}
_COMPILED: dict[str, CompiledEbnf] = {}


def compiled_for(which: str, vocab: TokenVocab) -> CompiledEbnf:
    if which not in _COMPILED:
        _COMPILED[which] = grammar(vocab, SCHEMAS[which], open_objects=which == "wide")
    return _COMPILED[which]


def sample(compiled: CompiledEbnf, gen: torch.Generator, vocab_size: int, max_tokens: int = 150, prefix: list[int] = ()) -> tuple[bytes, bool]:
    g = compiled.matcher()
    out = b""
    for token in prefix:
        assert g.accept_token(token), token
        out += compiled.vocab.by_id[token]
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab_size, generator=gen) * 2
        logits[0, EOS] += 3.0
        row = allocate_token_bitmask(1, vocab_size)
        g.fill_mask(row[0])
        apply_token_bitmask_(logits, row)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert g.accept_token(token), token
        if token == EOS:
            return out, True
        out += compiled.vocab.by_id[token]
    return out, False


def sample_schema(real: tuple[TokenVocab, object], which: str, seed: int) -> tuple[bytes, bool]:
    vocab, tok = real
    prefix = tok.encode(PREFIXES[which], add_special_tokens=False) if which in PREFIXES else []
    return sample(compiled_for(which, vocab), torch.Generator().manual_seed(seed), vocab.vocab_size, prefix=prefix)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(sorted(SCHEMAS)), seed=st.integers(0, 2**16))
def test_sampled_json_validates(real, which, seed):
    text, ended = sample_schema(real, which, seed)
    if ended:
        jsonschema.validate(json.loads(text), SCHEMAS[which])


@pytest.mark.parametrize("which", sorted(SCHEMAS))
def test_sampling_ends_often_enough_to_check(real, which):
    """The property test above checks only samples that end: enough must, or it checked little."""
    ended = 0
    for seed in range(10):
        text, done = sample_schema(real, which, seed)
        if done:
            jsonschema.validate(json.loads(text), SCHEMAS[which])
            ended += 1
    assert ended >= 3, f"{ended} of 10 samples of {which!r} ended within 150 tokens"


def test_mask_equals_brute_force(real):
    vocab, _ = real
    c = grammar(vocab, TREE)
    g = c.matcher()
    single = {b: t for t, b in vocab.by_id.items() if len(b) == 1}
    for text in ['{"value":1,"children":[{"value":', "2}]", "}"]:
        brute = {t for t, b in vocab.by_id.items() if c.walk(g.state, b)} | ({EOS} if c.can_end(g.state) else set())
        row = allocate_token_bitmask(1, vocab.vocab_size)
        g.fill_mask(row[0])
        assert set(unpack_bitmask(row, vocab.vocab_size)[0].nonzero().view(-1).tolist()) == brute
        for b in text.encode():
            assert g.accept_token(single[bytes([b])])
    assert g.is_terminated() or g.accept_token(EOS)


def test_huge_schema_regex_goes_straight_to_the_grammar(monkeypatch):
    from loom.runtime.constrained import backend as backend_module
    from loom.runtime.constrained import schema as schema_module

    monkeypatch.setattr(backend_module, "GRAMMAR_FIRST_CHARS", 10)

    def spelled(*args, **kwargs):  # the size is known before the regex is spelled out (seconds for big schemas)
        raise AssertionError("the regex past the limit was spelled out")

    with monkeypatch.context() as m:
        m.setattr(schema_module.RegexPieces, "fill", staticmethod(spelled))
        backend = GrammarBackend(BYTES, 258, frozenset({EOS}))
        compiled = backend._compile("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
        assert isinstance(compiled, CompiledEbnf)
        assert accepts(compiled, '{"a":1}') and not accepts(compiled, '{"a":"x"}')
        backend.shutdown()

    # where the grammar path refuses such a schema, the regex path still takes it (up to its own limit)
    def refused(*args, **kwargs):
        raise GrammarError("json_schema: refused by the grammar path (test)")

    monkeypatch.setattr(backend_module, "schema_to_grammar", refused)
    backend = GrammarBackend(BYTES, 258, frozenset({EOS}))
    compiled = backend._compile("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    assert not isinstance(compiled, CompiledEbnf)
    g = compiled.matcher()
    assert all(g.accept_token(b + 1) for b in b'{"a":1}') and g.accept_token(EOS)
    monkeypatch.setattr(backend_module, "MAX_SCHEMA_REGEX_CHARS", 10)  # past both limits: refused, with both reasons
    with pytest.raises(GrammarError, match="characters .limit 10.*as a grammar: json_schema: refused"):
        backend._compile("json_schema", json.dumps({"type": "object", "properties": {"b": {"type": "integer"}}}))
    backend.shutdown()


def test_draft4_exclusive_bounds_and_unresolved_keywords(byte_vocab):
    c = grammar(byte_vocab, {"type": "array", "items": {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "maximum": 9}})
    assert accepts(c, "[1,9]") and not accepts(c, "[0]") and not accepts(c, "[10]")
    with pytest.raises(GrammarError, match="recursiveRef"):
        schema_to_grammar(json.dumps({"type": "object", "properties": {"a": {"$recursiveRef": "#"}}}))


def test_open_objects_take_required_members_in_any_order_and_oneof_exactly(byte_vocab):
    dims = {"type": "object", "properties": {k: {"type": "number"} for k in ("base", "height", "length", "radius", "width")},
            "oneOf": [{"required": ["radius"]}, {"required": ["length", "width"]}, {"required": ["base", "height"]}]}  # fmt: skip
    schema = {"type": "object", "properties": {"shape": {"type": "string"}, "dimensions": dims, "tree": {"$ref": "#"}},
              "required": ["dimensions", "shape"]}  # recursive: the grammar path  # fmt: skip
    c = grammar(byte_vocab, schema, open_objects=True)
    assert accepts(c, '{"shape":"c","dimensions":{"radius":5}}')
    assert accepts(c, '{"dimensions":{"width":2,"length":1},"note":0,"shape":"c","tree":{"shape":"d","dimensions":{"base":1,"height":2}}}')
    assert not accepts(c, '{"shape":"c","dimensions":{"radius":5,"length":1,"width":2}}')  # two branches hold
    assert not accepts(c, '{"shape":"c"}')
    closed = grammar(byte_vocab, schema)  # declared order where objects are closed
    assert accepts(closed, '{"shape":"c","dimensions":{"radius":5}}') and not accepts(closed, '{"dimensions":{"radius":5},"shape":"c"}')



def test_stacks_stay_as_deep_however_many_members_and_items(byte_vocab):
    # Members and items are reduced onto the ones before them (left-linear rules): a 40-item array
    # of objects of repeated optional members meets the stacks a 3-item one met, so its masks and
    # the verdicts of tokens crossing a lexeme's end are reused, not recomputed per item.
    schema = {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                         "required": ["a"], "additionalProperties": False}}  # fmt: skip
    item = '{"b":"x","a":1,"b":"y","b":"z"}'
    c = grammar(byte_vocab, schema)
    assert accepts(c, f"[{item},{item},{item}]")
    few = c.num_stacks
    assert accepts(c, "[" + ",".join([item] * 40) + "]")
    assert c.num_stacks == few
    assert not accepts(c, '[{"b":"x"}]') and not accepts(c, '[{"a":1,"a":2}]')
    s = grammar(byte_vocab, {"type": "string", "minLength": 100})  # past its minimum, 64-character chunks in a loop
    assert accepts(s, json.dumps("a" * 300))
    few = s.num_stacks
    assert accepts(s, json.dumps("a" * 3000)) and s.num_stacks == few
