"""The same grammar cases on every grammar backend (outlines, xgrammar, llguidance): masks agree
where the languages agree, EOS only at final states, rollback and copy, clear errors, and end to
end through `LocalEngine(grammar_backend=...)` at temperature 1.0 on a tiny random model."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from loom.cli import build_parser
from loom.runtime.constrained import Grammar, GrammarBackend, GrammarError, allocate_token_bitmask, unpack_bitmask
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.server_args import ServerArgs
from loom.tiny_tokenizer import tiny_tokenizer

from grammars import PERSON_SCHEMA

BACKENDS = ("outlines", "xgrammar", "llguidance")
EOS = 0
TOY = {1: b"a", 2: b"b", 3: b"ab", 4: b"c", 5: b"\xc3", 6: b"\xa9", 7: b"\xc3\xa9", 8: b"1", 9: b"2", 10: b"-", 11: b"0"}
V = 40  # wider than the toy vocabulary, as model vocabularies often are


def allowed(grammar, vocab_size: int = V) -> list[int]:
    row = allocate_token_bitmask(1, vocab_size)
    grammar.fill_mask(row[0])
    return unpack_bitmask(row, vocab_size)[0].nonzero().view(-1).tolist()


@pytest.fixture(scope="module", params=BACKENDS)
def toy(request: pytest.FixtureRequest) -> GrammarBackend:
    backend = GrammarBackend(TOY, V, frozenset({EOS}), grammar_backend=request.param)
    yield backend
    backend.shutdown()


@pytest.fixture(scope="module")
def toys() -> dict[str, GrammarBackend]:
    backends = {name: GrammarBackend(TOY, V, frozenset({EOS}), grammar_backend=name) for name in BACKENDS}
    yield backends
    for backend in backends.values():
        backend.shutdown()


def matcher(backend: GrammarBackend, kind: str, source: str):
    return backend.compile(kind, source).result(timeout=60).matcher()


# ----------------------------------------------------------------------------- hand-made vocabulary


def assert_masks_agree(grammars: dict, vocab_size: int = V) -> list[int]:
    """outlines and xgrammar allow the same tokens; so does llguidance, except where the next bytes
    are forced: there it allows only the tokens of its own tokenization of them (a subset).
    -> the tokens every backend allows."""
    masks = {name: allowed(g, vocab_size) for name, g in grammars.items()}
    assert masks["xgrammar"] == masks["outlines"], masks
    if grammars["llguidance"].forced_bytes():
        assert masks["llguidance"] and set(masks["llguidance"]) <= set(masks["outlines"]), masks
    else:
        assert masks["llguidance"] == masks["outlines"], masks
    return masks["llguidance"]


@pytest.mark.parametrize("regex", ["ab?c", "(ab|c)+-?[0-2]", "(é|a)b", "é+1", "a*b*", "-?(0|[1-9][0-9]*)"])
def test_masks_agree_along_random_walks(toys, regex):
    """Along random walks through the regex (multi-byte characters split across tokens included)."""
    rng = random.Random(regex)
    for _ in range(8):
        grammars = {name: matcher(b, "regex", regex) for name, b in toys.items()}
        for _step in range(12):
            token = rng.choice(assert_masks_agree(grammars))
            for name, g in grammars.items():
                assert g.accept_token(token), (name, token)
            if token == EOS:
                assert all(g.is_terminated() for g in grammars.values())
                break


def test_eos_only_at_final_states(toy):
    g = matcher(toy, "regex", "ab?c")
    assert allowed(g) == [1, 3] and not g.accept_token(EOS)
    assert g.accept_token(1) and allowed(g) == [2, 4] and not g.is_terminated()
    assert g.accept_token(4) and allowed(g) == [EOS]
    assert g.is_terminated()  # final, and nothing but EOS may follow
    g = matcher(toy, "regex", "a+")
    assert g.accept_token(1) and allowed(g) == [EOS, 1]
    assert not g.is_terminated()  # final, but more may follow
    assert g.accept_token(EOS) and g.is_terminated()
    assert not g.accept_token(1) and not g.accept_token(EOS)  # nothing after EOS


def test_refused_tokens_leave_the_state(toy):
    g = matcher(toy, "regex", "ab?c")
    for token in (2, 4, 12, V - 1, V + 5, EOS):  # wrong bytes, special ids, past the vocabulary, early EOS
        assert not g.accept_token(token)
    assert allowed(g) == [1, 3]
    assert g.accept_token(3) and allowed(g) == [4]


def test_rollback_and_copy_are_independent(toy):
    g = matcher(toy, "regex", "(ab|c)+")
    start = allowed(g)
    assert g.accept_token(3)
    after_ab = allowed(g)
    assert g.accept_token(4)
    after_abc = allowed(g)
    fork = g.copy()
    assert g.accept_token(EOS) and g.is_terminated()
    assert not fork.is_terminated() and allowed(fork) == after_abc
    g.rollback(2)  # EOS and "c": back after "ab"
    assert not g.is_terminated() and allowed(g) == after_ab
    assert g.accept_token(4) and allowed(g) == after_abc
    g.rollback(2)
    assert allowed(g) == start
    with pytest.raises(ValueError, match="cannot roll back 1 tokens: only 0"):
        g.rollback(1)
    assert fork.accept_token(4) and fork.accept_token(EOS) and fork.is_terminated()


def test_every_matcher_is_a_grammar_and_lists_its_mask_or_nothing(toy):
    g = matcher(toy, "regex", "(ab|c)+")
    assert isinstance(g, Grammar) and isinstance(g.copy(), Grammar)
    assert g.accept_token(4)  # "c": "a", "ab", "c" or EOS next
    ids = g.allowed_ids(V)
    if toy.grammar_backend == "loom":  # Loom's own masks list their tokens; the others say nothing
        assert ids.tolist() == allowed(g) == [EOS, 1, 3, 4]
        assert g.allowed_ids(3) is None  # more than the limit
    else:
        assert ids is None


@pytest.mark.parametrize(
    "name",
    ["outlines", "xgrammar", "llguidance"],  # outlines-core 0.2.14's Index dropped these; Loom's regex DFA does not
)
@pytest.mark.parametrize(("regex", "tokens", "expected"), [("(ab|c)+", [3], 1), ("[0-2]+(-[0-2]+)?", [8], 10)])
def test_tokens_leaving_a_final_state_are_allowed(toys, name, regex, tokens, expected):
    """After "ab" in (ab|c)+ the text may go on with "a"; after "1" in [0-2]+(-[0-2]+)? with "-"."""
    g = matcher(toys[name], "regex", regex)
    assert all(g.accept_token(t) for t in tokens)
    assert EOS in allowed(g) and expected in allowed(g)


@pytest.mark.parametrize(
    ("regex", "tokens", "forced"),
    [("abc|ab1", [], b"ab"), ("a(bc)?", [1], b""), ("a(bc)?", [], b"a"), ("(ab|c)+", [3], b""), ("é1", [], b"\xc3\xa91")],
)
def test_forced_bytes(toy, regex, tokens, forced):
    g = matcher(toy, "regex", regex)
    if not hasattr(g, "forced_bytes"):
        pytest.skip("RegexGrammar.forced_bytes lands with jump-forward decoding")
    assert all(g.accept_token(t) for t in tokens)
    assert g.forced_bytes() == forced


def test_schema_whitespace_is_bounded(toy):
    """A JSON Schema's output starts with "{" on every backend; at most one space goes between
    tokens (xgrammar: its fixed separators, no space after "{")."""
    tb = {**TOY, 12: b"{", 13: b" ", 14: b"  ", 15: b'"', 16: b"\n", 17: b":", 18: b"}"}
    backend = GrammarBackend(tb, V, frozenset({EOS}), grammar_backend=toy.grammar_backend)
    try:
        g = matcher(backend, "json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
        assert allowed(g) == [12] and g.accept_token(12)
        assert 15 in allowed(g) and not {14, 16} & set(allowed(g))
        if 13 in allowed(g):
            assert g.accept_token(13) and not {13, 14, 16} & set(allowed(g))
    finally:
        backend.shutdown()


@pytest.mark.parametrize("open_objects", [False, True], ids=["closed", "open"])
def test_objects_without_additional_properties_are_closed_unless_asked(toy, open_objects):
    """Every backend keeps to the declared keys where `additionalProperties` is absent (llguidance
    follows the spec there unless told), nested objects and $defs included; json_open_objects
    opens them all."""
    tb = {b + 1: bytes([b]) for b in range(128)}
    backend = GrammarBackend(tb, 129, frozenset({EOS}), grammar_backend=toy.grammar_backend, json_open_objects=open_objects)
    inner = {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}
    schema = {"$defs": {"inner": inner}, "type": "object", "properties": {"a": {"$ref": "#/$defs/inner"}}, "required": ["a"]}
    try:
        for text in ('{"a": {"b": 1', '{"a": {"b": 1}'):  # a comma after the last declared member opens a new key
            g = matcher(backend, "json_schema", json.dumps(schema))
            assert all(g.accept_token(c + 1) for c in text.encode()), text
            assert (ord(",") + 1 in allowed(g, 129)) == open_objects, text
    finally:
        backend.shutdown()


@pytest.mark.parametrize(
    ("kind", "source", "needle"),
    [
        ("regex", "(unclosed", "(unclosed"),
        ("json_schema", "{not json", "json_schema"),
        ("ebnf", 'root ::= "x" (', "ebnf"),
        ("lark", "start: (", "lark"),
        ("nope", "x", "unknown grammar kind"),
    ],
)
def test_invalid_grammars_are_refused_with_a_message(toy, kind, source, needle):
    with pytest.raises(GrammarError, match=re.escape(needle)):
        toy.compile(kind, source).result(timeout=60)


@pytest.mark.parametrize(("kind", "source", "text"), [("ebnf", 'root ::= "a" ("b" | "c")+', b"abc"), ("lark", 'start: "a" B+\nB: "b" | "c"', b"acb")])
def test_context_free_grammars(kind, source, text):
    """GBNF and Lark on the native backends (the outlines backend's own EBNF has its own tests)."""
    for name in ("xgrammar", "llguidance"):
        backend = GrammarBackend(TOY, V, frozenset({EOS}), grammar_backend=name)
        try:
            g = matcher(backend, kind, source)
            ids = {b: i for i, b in TOY.items()}
            assert all(g.accept_token(ids[bytes([c])]) for c in text), name
            assert EOS in allowed(g) and g.accept_token(EOS) and g.is_terminated()
        finally:
            backend.shutdown()


# ----------------------------------------------------------------------------- a real tokenizer


def real_token_bytes() -> dict[int, bytes]:
    from loom.runtime.constrained import token_bytes

    tok = tiny_tokenizer(512)

    class HFLike:  # the slice of a Hugging Face tokenizer that `token_bytes` reads
        all_special_ids = [0, 1, 2]
        added_tokens_decoder = {0: None, 1: None, 2: None}

        def get_vocab(self) -> dict[str, int]:
            return tok.get_vocab(with_added_tokens=True)

    return token_bytes(HFLike())


@pytest.mark.parametrize("regex", [r"(yes|no|maybe)!", r"[0-9]{1,3}\.[0-9]{2}", r"The (cat|dog) sat\."])
def test_real_tokenizer_masks_agree(regex):
    """On a trained byte-level BPE vocabulary padded to a wider model vocab (600 > 512), the masks
    agree along walks (as above), and every walk spells a match."""
    tb, vocab_size, eos = real_token_bytes(), 600, frozenset({0, 2})
    backends = {name: GrammarBackend(tb, vocab_size, eos, grammar_backend=name) for name in BACKENDS}
    rng = random.Random(regex)
    try:
        for _ in range(5):
            grammars = {name: matcher(b, "regex", regex) for name, b in backends.items()}
            out = b""
            while True:
                token = rng.choice(assert_masks_agree(grammars, vocab_size))
                assert token < 512  # padding ids are never allowed
                assert all(g.accept_token(token) for g in grammars.values())
                if token in eos:
                    break
                out += tb[token]
            assert re.fullmatch(regex, out.decode("utf-8"))
    finally:
        for b in backends.values():
            b.shutdown()


def test_json_strings_never_hold_raw_control_characters():
    """Raw bytes < 0x20 are invalid inside JSON strings (xgrammar 0.2.8 lets them into strings with
    a length bound; Loom masks them out)."""
    tb = real_token_bytes()
    control = {i for i, b in tb.items() if any(c < 0x20 for c in b)}
    for name in ("xgrammar", "llguidance"):
        backend = GrammarBackend(tb, 600, frozenset({0, 2}), grammar_backend=name)
        try:
            for schema in ({"type": "string", "maxLength": 8}, {"type": "string", "minLength": 1}, {"type": "string"}):
                g = matcher(backend, "json_schema", json.dumps(schema))
                assert g.accept_token(next(i for i, b in tb.items() if b == b'"'))
                assert not control & set(allowed(g, 600)), (name, schema)
                assert not g.accept_token(min(control))
        finally:
            backend.shutdown()


# ----------------------------------------------------------------------------- end to end


# llguidance follows the spec and allows extra properties unless told not to; a random model then
# wanders off into long keys (outlines and xgrammar's default strict mode never emit them).
SCHEMA = {**PERSON_SCHEMA, "additionalProperties": False}
REGEX = r"(cat|dog)s? [0-9]{1,3}(\.[0-9]{2})?"


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request: pytest.FixtureRequest, make_tiny_model):
    path = make_tiny_model("qwen2", vocab_size=512, seed=11)
    with LocalEngine(model_path=str(path), max_total_tokens=4096, grammar_backend=request.param) as eng:
        yield eng


def test_outputs_match_at_temperature_one(engine):
    n = 3
    prompts = ["Pick:"] * n + ["JSON:"] * n + ["Free text"]
    params = (
        [{"regex": REGEX, "temperature": 1.0, "max_new_tokens": 40, "seed": s} for s in range(n)]
        + [{"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": 120, "seed": s} for s in range(n)]
        + [{"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}]
    )
    outs = engine.generate(prompts, params)
    for out in outs[:n]:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
        assert re.fullmatch(REGEX, out["text"]), out["text"]
    for out in outs[n : 2 * n]:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
        jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert outs[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_invalid_grammars_abort_alone(engine):
    outs = engine.generate(
        ["a", "b", "c"],
        [
            {"regex": "(unclosed", "max_new_tokens": 5},
            {"json_schema": json.dumps({"type": "object", "properties": {"a": {"type": "nope"}}}), "max_new_tokens": 5},
            {"regex": "[0-9]{2}", "temperature": 1.0, "max_new_tokens": 8},
        ],
    )
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert reasons[0]["type"] == "abort" and "(unclosed" in reasons[0]["message"]
    assert reasons[1]["type"] == "abort" and "json_schema" in reasons[1]["message"] and "nope" in reasons[1]["message"]
    assert outs[0]["output_ids"] == [] and outs[1]["output_ids"] == []
    assert reasons[2]["type"] == "stop" and re.fullmatch("[0-9]{2}", outs[2]["text"])
    assert engine.scheduler.grammar_queue == [] and not engine.scheduler.has_work()


# ----------------------------------------------------------------------------- configuration


def test_grammar_backend_argument_is_checked(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"grammar_backend must be one of loom, xgrammar, llguidance \(outlines is an alias of loom\), got 'lark'"):
        ServerArgs(model_path=str(tmp_path), grammar_backend="lark")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgrammar" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs the xgrammar package.*pip install 'loom\[grammar\]'"):
        ServerArgs(model_path=str(tmp_path), grammar_backend="xgrammar")


def test_outlines_is_another_name_for_the_loom_backend(tmp_path):
    assert ServerArgs(model_path=str(tmp_path), grammar_backend="outlines").grammar_backend == "loom"
    assert ServerArgs(model_path=str(tmp_path)).grammar_backend == "loom"
    loom, outlines = (GrammarBackend(TOY, V, frozenset({EOS}), grammar_backend=name) for name in ("loom", "outlines"))
    try:
        assert loom.grammar_backend == outlines.grammar_backend == "loom"
        grammars = [matcher(b, "regex", "(ab|c)+1?") for b in (loom, outlines)]
        assert type(grammars[0]) is type(grammars[1])
        assert allowed(grammars[0]) == allowed(grammars[1]) == [1, 3, 4]
    finally:
        loom.shutdown()
        outlines.shutdown()


def test_cli_explains_the_flag():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    assert "--grammar-backend" in text and "llguidance" in text and "loom[grammar]" in text
    assert serve.parse_args(["--model", "m", "--grammar-backend", "xgrammar"]).grammar_backend == "xgrammar"
