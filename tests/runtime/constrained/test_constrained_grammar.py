"""Grammar objects on hand-made vocabularies (where the right mask is known), then a real tokenizer."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest
import torch

from loom.runtime.constrained import (
    ErrorKind,
    GrammarBackend,
    GrammarError,
    allocate_token_bitmask,
    apply_token_bitmask_,
    pack_allowed,
    schema_to_regex,
    token_bytes,
    unpack_bitmask,
)
from loom.runtime.constrained.json_regex import integer_range_regex
from loom.tiny_tokenizer import tiny_tokenizer

EOS = 0
TOY = {1: b"a", 2: b"b", 3: b"ab", 4: b"c", 5: b"\xc3", 6: b"\xa9", 7: b"\xc3\xa9", 8: b"1", 9: b"2", 10: b"-", 11: b"0"}
V = 40  # wider than the toy vocabulary, as model vocabularies often are


def allowed(grammar) -> list[int]:
    row = allocate_token_bitmask(1, V)
    grammar.fill_mask(row[0])
    return unpack_bitmask(row, V)[0].nonzero().view(-1).tolist()


@pytest.fixture(scope="module")
def toy() -> GrammarBackend:
    return GrammarBackend(TOY, V, frozenset({EOS}))


def compile_regex(backend: GrammarBackend, regex: str):
    return backend.compile("regex", regex).result(timeout=30).matcher()


# ----------------------------------------------------------------------------- bitmask


def test_pack_unpack_roundtrip_and_apply_in_place():
    ids = [0, 5, 31, 32, 63, 64, 69]
    row = pack_allowed(ids, 70)
    assert row.dtype == torch.int32 and row.shape == (3,)
    assert unpack_bitmask(row.view(1, -1), 70)[0].nonzero().view(-1).tolist() == ids
    logits = torch.zeros(3, 70)
    bitmask = torch.stack([row, pack_allowed([7], 70)])
    apply_token_bitmask_(logits, bitmask, torch.tensor([0, 2]))
    assert torch.isfinite(logits[0]).nonzero().view(-1).tolist() == ids
    assert torch.isfinite(logits[1]).all()  # a row without a grammar is untouched
    assert torch.isfinite(logits[2]).nonzero().view(-1).tolist() == [7]


# ----------------------------------------------------------------------------- toy vocabularies


def test_masks_follow_the_regex(toy):
    g = compile_regex(toy, "ab?c")
    assert allowed(g) == [1, 3]  # "a", "ab"
    assert g.accept_token(1)
    assert allowed(g) == [2, 4]  # "b", "c"
    assert not g.accept_token(1)  # "aa" cannot match: refused, state unchanged
    assert allowed(g) == [2, 4]
    assert g.accept_token(4) and allowed(g) == [EOS]
    assert g.is_terminated()  # final, and only EOS may follow


def test_eos_allowed_exactly_at_final_states(toy):
    g = compile_regex(toy, "a+")
    assert EOS not in allowed(g) and not g.accept_token(EOS)
    assert g.accept_token(1)
    assert allowed(g) == [EOS, 1]  # may end or continue
    assert not g.is_terminated()
    assert g.accept_token(EOS) and g.is_terminated()
    assert not g.accept_token(1)


def test_multibyte_tokens_and_partial_utf8(toy):
    g = compile_regex(toy, "é+c")
    assert allowed(g) == [5, 7]  # the whole character, or its first byte alone
    assert g.accept_token(5)
    assert allowed(g) == [6]  # only the byte that completes "é"
    assert g.accept_token(6) and allowed(g) == [4, 5, 7]


def test_rollback_and_copy_are_independent(toy):
    g = compile_regex(toy, "(a|b)*c")
    assert g.accept_token(1) and g.accept_token(2)
    h = g.copy()
    assert h.accept_token(4) and h.is_terminated()
    assert not g.is_terminated() and allowed(g) == [1, 2, 3, 4]
    g.rollback(2)
    assert allowed(g) == [1, 2, 3, 4]
    assert g.accept_token(4) and g.is_terminated()
    g.rollback(1)
    assert not g.is_terminated()
    with pytest.raises(ValueError, match="cannot roll back"):
        g.rollback(5)


def test_integer_bounds_become_exact_masks(toy):
    compiled = toy.compile("json_schema", json.dumps({"type": "integer", "minimum": -2, "maximum": 12})).result()
    g = compiled.matcher()
    assert allowed(g) == [8, 9, 10, 11]  # "1", "2", "-", "0"
    h = g.copy()
    assert g.accept_token(10) and allowed(g) == [8, 9]  # -1, -2; never "-0"
    assert g.accept_token(9) and g.is_terminated()
    assert h.accept_token(8) and allowed(h) == [EOS, 8, 9, 11]  # 1, or 10, 11, 12
    assert h.accept_token(9) and allowed(h) == [EOS]  # 12 and nothing more
    z = compiled.matcher()
    assert z.accept_token(11) and z.is_terminated()  # "0" only; no leading zeros


def test_cache_invalid_and_unsupported(toy):
    a = toy.compile("regex", "a+")
    assert toy.compile("regex", "a+") is a  # one compilation per (kind, source)
    with pytest.raises(GrammarError, match="cannot be compiled"):
        toy.compile("regex", "(").result()
    with pytest.raises(GrammarError, match="'nope', which is not defined"):
        toy.compile("ebnf", 'root ::= "a" nope').result()
    small = GrammarBackend(TOY, V, frozenset({EOS}), cache_size=2)
    for r in ("a", "b", "c"):
        small.compile("regex", r)
    assert len(small._cache) == 2  # LRU-bounded


# ----------------------------------------------------------------------------- schemas


@pytest.mark.parametrize(
    "lo,hi", [(0, 0), (3, 17), (-5, 5), (-100, -3), (10, 99), (0, 1000), (7, None), (None, 5), (None, -7), (-12, None), (123, 4567)]
)
def test_integer_range_regex_is_exact(lo, hi):
    pattern = re.compile(f"(?:{integer_range_regex(lo, hi)})")
    for x in range(-1500, 5000):
        assert bool(pattern.fullmatch(str(x))) == ((lo is None or x >= lo) and (hi is None or x <= hi)), x
    assert not pattern.fullmatch("-0") and not pattern.fullmatch("007")


def test_refs_and_allof_are_normalised():
    schema = {
        "$defs": {"Age": {"type": "integer", "minimum": 0, "maximum": 150}},
        "allOf": [
            {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5}}, "required": ["name"]},
            {"type": "object", "properties": {"age": {"$ref": "#/$defs/Age"}}, "required": ["age"]},
        ],
    }
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    good = '{"name": "ann", "age": 42}'
    assert regex.fullmatch(good)
    jsonschema.validate(json.loads(good), schema)
    assert not regex.fullmatch('{"name": "ann", "age": 151}')
    assert not regex.fullmatch('{"name": "ann"}')


@pytest.mark.parametrize(
    "schema,needle",
    [
        ({"type": "number", "minimum": 1.5}, "'minimum'"),
        ({"type": "integer", "multipleOf": 3}, "'multipleOf'"),
        ({"type": "string", "maxLength": 100_000}, "maxLength=100000"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "'uniqueItems'"),
        ({"$ref": "#/$defs/missing"}, "points at nothing"),
        ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}, "recursive"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "admit no value"),
        ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "conflicting 'type'"),
        (False, "admits no value"),
    ],
)
def test_unenforceable_schemas_are_refused_by_name(schema, needle):
    with pytest.raises(GrammarError) as err:
        schema_to_regex(json.dumps(schema))
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "source,kind",
    [
        ("{nope", ErrorKind.MALFORMED),  # not JSON: no compiler can take it
        ("false", ErrorKind.EMPTY),  # admits no value at all
        (json.dumps({"type": "integer", "minimum": 5, "maximum": 1}), ErrorKind.INVALID),
        (json.dumps({"type": "integer", "multipleOf": 3}), ErrorKind.INVALID),
    ],
)
def test_schema_errors_carry_their_kind(source, kind):
    with pytest.raises(GrammarError) as err:
        schema_to_regex(source)
    assert err.value.kind is kind
    copied = pickle.loads(pickle.dumps(err.value))  # the same error across a process boundary
    assert isinstance(copied, GrammarError) and copied.kind is kind and str(copied) == str(err.value)


def test_true_schema_is_any_json_value():
    regex = re.compile(schema_to_regex("true"))
    for text in ["null", "1.5", '"x"', "[1, 2]"]:
        assert regex.fullmatch(text), text


def test_type_lists_split_keywords_by_type():
    schema = {"type": ["integer", "null", "string"], "minimum": 1, "maximum": 5, "maxLength": 2}
    regex = re.compile(schema_to_regex(json.dumps(schema)))
    for text in ["1", "5", "null", '"ab"']:
        assert regex.fullmatch(text), text
        jsonschema.validate(json.loads(text), schema)
    for text in ["0", "6", '"abc"', "true"]:
        assert not regex.fullmatch(text), text


def test_whitespace_is_bounded_by_default():
    regex = re.compile(schema_to_regex(json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}})))
    assert regex.fullmatch('{"a": true}')
    assert not regex.fullmatch('{"a":     true}')


# ----------------------------------------------------------------------------- a real tokenizer


def test_real_tokenizer_bytes_roundtrip():
    tok = tiny_tokenizer(512)
    tb = token_bytes_from_tokenizers(tok)
    assert not {0, 1, 2} & set(tb)  # special tokens get no bytes: a grammar never emits them
    text = "héllo wörld ✓ {\"a\": 1}"
    ids = tok.encode(text).ids
    assert b"".join(tb[i] for i in ids) == text.encode("utf-8")
    assert any(not _is_utf8(b) for b in tb.values())  # some tokens are partial characters


def test_real_tokenizer_masks_spell_the_regex():
    tok = tiny_tokenizer(512)
    tb = token_bytes_from_tokenizers(tok)
    backend = GrammarBackend(tb, 512, frozenset({0, 2}))
    g = backend.compile("regex", "(yes|no|maybe)!").result().matcher()
    out = b""
    while not g.is_terminated():
        row = allocate_token_bitmask(1, 512)
        g.fill_mask(row[0])
        choices = unpack_bitmask(row, 512)[0].nonzero().view(-1).tolist()
        assert choices and not {1} & set(choices)
        token = max(choices)  # any allowed token must keep the text matchable
        if token in (0, 2):
            assert g.accept_token(token)
            break
        out += tb[token]
        assert g.accept_token(token)
    assert re.fullmatch("(yes|no|maybe)!", out.decode("utf-8"))


class _HFLike:
    """The slice of a Hugging Face tokenizer that `token_bytes` reads."""

    def __init__(self, tok) -> None:
        self._tok = tok
        self.all_special_ids = [0, 1, 2]
        self.added_tokens_decoder = {0: None, 1: None, 2: None}

    def get_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=True)


def token_bytes_from_tokenizers(tok) -> dict[int, bytes]:
    return token_bytes(_HFLike(tok))


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_sentencepiece_vocabularies_map_spaces_and_byte_tokens():
    class SP:
        all_special_ids = [0]
        added_tokens_decoder: dict = {}

        def get_vocab(self) -> dict[str, int]:
            return {"</s>": 0, "\u2581the": 1, "<0x0A>": 2, "é": 3, "<0xC3>": 4}

    assert token_bytes(SP()) == {1: b" the", 2: b"\n", 3: "é".encode(), 4: b"\xc3"}


def test_apply_matches_a_reference_for_every_row_layout():
    gen = torch.Generator().manual_seed(0)
    V = 77
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32, generator=gen)
    ref = torch.tensor([[bool((int(bitmask[r, t // 32]) >> (t % 32)) & 1) for t in range(V)] for r in range(4)])
    assert torch.equal(unpack_bitmask(bitmask, V), ref)
    layouts = [(4, None), (4, [0, 1, 2, 3]), (4, [2, 0, 3, 1]), (6, [5, 1, 3, 0])]  # (batch rows, rows)
    for batch, rows in layouts:
        logits = torch.randn(batch, V, generator=gen)
        want = logits.clone()
        for j, r in enumerate(range(4) if rows is None else rows):
            want[r][~ref[j]] = float("-inf")
        apply_token_bitmask_(logits, bitmask, None if rows is None else torch.tensor(rows))
        assert torch.equal(logits, want), rows
