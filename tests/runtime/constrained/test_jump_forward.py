"""Jump-forward: forced strings on hand-made vocabularies (known answers), then a real tokenizer,
then end to end through `loom.Engine` with jump-forward on and off."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from loom.runtime.constrained import GrammarBackend, token_bytes
from loom.runtime.constrained.jump_forward import plan_jump_forward, whole_characters
from loom.runtime.entrypoints.engine import LocalEngine
from loom.tiny_tokenizer import tiny_tokenizer

EOS = 0
TOY = {1: b"a", 2: b"b", 3: b"ab", 4: b"c", 5: b"\xc3", 6: b"\xa9", 7: b"\xc3\xa9", 8: b"1", 9: b"abc"}
V = 40

# Long fixed keys: what jump-forward is for.
SCHEMA = {
    "type": "object",
    "properties": {
        "customer_identifier": {"type": "string", "maxLength": 6},
        "shipping_address_line": {"type": "string", "maxLength": 6},
        "is_priority_delivery": {"type": "boolean"},
    },
    "required": ["customer_identifier", "shipping_address_line", "is_priority_delivery"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def toy() -> GrammarBackend:
    return GrammarBackend(TOY, V, frozenset({EOS}))


def matcher(backend: GrammarBackend, kind: str, source: str):
    return backend.compile(kind, source).result(timeout=60).matcher()


# ----------------------------------------------------------------------------- toy vocabularies


@pytest.mark.parametrize(
    ("regex", "forced"),
    [
        ("abc", b"abc"),  # "a", "ab" and "abc" all allowed: their common prefix, then on
        ("ab?c", b"a"),  # "b" or "c" next
        ("ab(ca|cb)b", b"abc"),
        ("éé?c", "é".encode()),  # a character over two byte tokens
        ("a+", b"a"),  # forced "a", then a final state: EOS may end it there
        ("(abc)*", b""),  # the start is final
        ("[ab]c", b""),
    ],
)
def test_forced_bytes_known_answers(toy, regex, forced):
    assert matcher(toy, "regex", regex).forced_bytes() == forced


def test_forced_bytes_follow_the_state_and_stop_at_final_states(toy):
    g = matcher(toy, "regex", "ab(c1|b)")
    assert g.forced_bytes() == b"ab"
    assert g.accept_token(1) and g.forced_bytes() == b"b"
    assert g.accept_token(2) and g.forced_bytes() == b""  # "c" or "b"
    h = g.copy()
    assert h.accept_token(4) and h.forced_bytes() == b"1"
    assert g.forced_bytes() == b""  # the copy moved alone
    h.rollback(1)
    assert h.forced_bytes() == b""
    f = matcher(toy, "regex", "abc?")
    assert f.accept_token(3) and f.forced_bytes() == b""  # final: EOS may end it, or "c"
    assert f.accept_token(EOS) and f.forced_bytes() == b""


def test_whole_characters_cut_partial_utf8():
    assert whole_characters("é".encode() + b"x") == "éx"
    assert whole_characters(b"ab\xc3") == "ab"
    assert whole_characters(b"\xa9ab") == ""  # starts inside a character


# ----------------------------------------------------------------------------- a real tokenizer


class _HFLike:
    """The slices of a Hugging Face tokenizer that `token_bytes` and the scheduler's callables read."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.all_special_ids = [0, 1, 2]
        self.added_tokens_decoder = {0: None, 1: None, 2: None}

    def get_vocab(self) -> dict[str, int]:
        return self.tok.get_vocab(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def real():
    tok = _HFLike(tiny_tokenizer(512))
    return tok, GrammarBackend(token_bytes(tok), 512, frozenset({0, 2}))


def test_forced_bytes_real_tokenizer(real):
    tok, backend = real
    g = matcher(backend, "regex", r'\{"name": "[a-z]+"\}')
    assert g.forced_bytes() == b'{"name": "'
    for t in tok.encode('{"name": "bo'):
        assert g.accept_token(t)
    assert g.forced_bytes() == b""  # a letter or the closing quote
    for t in tok.encode('b"'):
        assert g.accept_token(t)
    assert g.forced_bytes() == b"}"
    s = matcher(backend, "json_schema", json.dumps(SCHEMA))
    assert s.forced_bytes() == b"{"  # then an optional space (whitespace is `[ ]?`)
    for t in tok.encode('{ '):
        assert s.accept_token(t)
    assert s.forced_bytes() == b'"customer_identifier"'


def test_plan_jump_forward_tokenizes_canonically_across_the_seam(real):
    tok, backend = real
    g = matcher(backend, "regex", r'\{"name": "[a-z]+"\}')
    prompt = tok.encode("Answer:")
    first = tok.encode("{")  # what the model sampled (the forced string's first token)
    assert len(first) == 1 and g.accept_token(first[0])
    jump = plan_jump_forward(g, prompt[-1:] + first, 1, 100, tok.decode, tok.encode)
    assert jump is not None and jump.backoff == 1
    canonical = tok.encode('{"name": "')
    assert jump.new_ids == canonical[:-1]  # the seam token is left for the model
    assert jump.gain == len(canonical) - 2
    # The grammar is where those tokens lead: the rest of the forced string, then a letter.
    assert g.forced_bytes() == tok.decode(canonical[-1:]).encode()


def test_plan_jump_forward_refuses_a_tokenizer_that_changes_the_text(real):
    tok, backend = real
    g = matcher(backend, "regex", r"\{abcdefgh\}")
    assert g.accept_token(tok.encode("{")[0])
    before = g.forced_bytes()

    def prefix_space(text: str) -> list[int]:  # a SentencePiece-style dummy prefix
        return tok.encode(" " + text)

    assert plan_jump_forward(g, tok.encode("x{"), 1, 100, tok.decode, prefix_space) is None
    assert g.forced_bytes() == before  # the grammar was restored


def test_plan_jump_forward_respects_the_token_budget(real):
    tok, backend = real
    g = matcher(backend, "regex", r"\{abcdefghijklmnopqrstuvwxyz[0-9]\}")
    assert g.accept_token(tok.encode("{")[0])
    jump = plan_jump_forward(g, tok.encode("x{"), 1, 2, tok.decode, tok.encode)
    assert jump is None or jump.gain <= 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model_path(make_tiny_model) -> str:
    return str(make_tiny_model("qwen2", vocab_size=512, seed=11))


@pytest.fixture(scope="module")
def engines(model_path):
    with (
        LocalEngine(model_path=model_path, max_total_tokens=4096, debug_check_memory=True) as on,
        LocalEngine(model_path=model_path, max_total_tokens=4096, debug_check_memory=True, disable_jump_forward=True) as off,
    ):
        yield on, off


def valid(out: dict) -> dict:
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
    value = json.loads(out["text"])
    jsonschema.validate(value, SCHEMA)
    return value


def schema_params(**kw) -> dict:
    return {"json_schema": json.dumps(SCHEMA), "max_new_tokens": 200, **kw}


def test_jump_forward_is_the_default_and_saves_decode_steps(engines):
    on, off = engines
    assert on.scheduler.jump_forward and not off.scheduler.jump_forward
    prompts = [f"Customer {i} as JSON:" for i in range(6)]
    steps = []
    for eng in (on, off):
        before = dict(eng.scheduler.stats)
        outs = eng.generate(prompts, schema_params(temperature=0))
        for out in outs:
            valid(out)
        steps.append(eng.scheduler.stats["decode_steps"] - before["decode_steps"])
    # Greedy on vs off need not give the same text: the canonical tokenization of a forced key
    # can differ from the tokens the model would have picked one by one, and the model then sees
    # different context. What holds: both are valid, and jump-forward needs fewer decode steps.
    assert steps[0] < steps[1], steps
    assert on.scheduler.stats["jump_forwards"] > 0 and off.scheduler.stats["jump_forwards"] == 0


def test_regex_outputs_match_at_temperature_one(engines):
    on, _ = engines
    regex = r'\{"name": "[a-z]{1,6}", "city": "(Paris|London|Tokyo)", "id": [0-9]{3}\}'
    outs = on.generate(["a", "b", "c", "d"], [{"regex": regex, "temperature": 1.0, "seed": i, "max_new_tokens": 120} for i in range(4)])
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
        assert re.fullmatch(regex, out["text"]), out["text"]


@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_memory_invariant_holds_under_tight_kv_memory(model_path, disable_radix_cache):
    # Little KV memory: requests are retracted and re-prefilled with jump-forwarded tokens in flight;
    # debug_check_memory asserts free + evictable + protected + held == capacity after every step.
    with LocalEngine(
        model_path=model_path, max_total_tokens=320, chunked_prefill_size=16, debug_check_memory=True,
        disable_radix_cache=disable_radix_cache,
    ) as eng:  # fmt: skip
        eng.scheduler.new_token_ratio = 0.0  # admit optimistically: decoding then outgrows the pool
        outs = eng.generate([f"Order {i}:" for i in range(10)], [schema_params(temperature=1.0, seed=i) for i in range(10)])
        for out in outs:
            valid(out)
        stats = eng.scheduler.stats
        assert stats["jump_forwards"] > 0 and stats["retracted"] > 0, stats
        eng.scheduler.check_memory()
        assert eng.scheduler.held_tokens() == 0


def test_backing_off_tokens_with_kv_frees_their_slots(model_path, monkeypatch):
    # With a back-off of 2 the token before the sampled one already has KV: its slot is freed and
    # the next step recomputes it (the memory invariant is checked after every step).
    import loom.runtime.scheduler.output as scheduler_module  # where _jump_forward reads it

    monkeypatch.setattr(scheduler_module, "MAX_BACKOFF", 2)
    with LocalEngine(model_path=model_path, max_total_tokens=2048, debug_check_memory=True) as eng:
        outs = eng.generate([f"Order {i}:" for i in range(4)], [schema_params(temperature=1.0, seed=i) for i in range(4)])
        for out in outs:
            valid(out)
        assert eng.scheduler.stats["jump_forwards"] > 0
        assert eng.scheduler.held_tokens() == 0


def test_streamed_text_equals_the_final_text(engines):
    on, _ = engines
    for seed in range(3):
        params = schema_params(temperature=1.0, seed=seed)
        chunks = list(on.generate("Stream JSON:", params, stream=True))
        final = on.generate("Stream JSON:", params)
        assert "".join(c["text"] for c in chunks) == final["text"]
        assert [t for c in chunks for t in c["output_ids"]] == final["output_ids"]
        valid(final)


def test_max_new_tokens_cuts_a_jump(engines):
    on, _ = engines
    out = on.generate("x", schema_params(temperature=0, max_new_tokens=5))
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert len(out["output_ids"]) == 5 and out["text"].startswith('{')


def test_logprob_requests_decode_every_token(engines):
    # Forced tokens were never sampled, so they would have no honest logprob: requests asking for
    # logprobs skip jump-forward and every output token carries the model's logprob.
    on, _ = engines
    before = on.scheduler.stats["jump_forwards"]
    out = on.generate("x", schema_params(temperature=0), return_logprob=True)
    valid(out)
    assert on.scheduler.stats["jump_forwards"] == before
    lps = out["meta_info"]["output_token_logprobs"]
    assert len(lps) == len(out["output_ids"]) and all(isinstance(lp[0], float) for lp in lps)


def test_n_samples_have_independent_grammar_states(engines):
    # OpenAI `n` runs n requests (openai_api.run); each gets its own matcher of one compiled grammar.
    on, _ = engines
    outs = on.generate(["Same prompt:"] * 4, [schema_params(temperature=1.0, seed=100 + i) for i in range(4)])
    values = [valid(out) for out in outs]
    assert len({json.dumps(v, sort_keys=True) for v in values}) > 1, values
