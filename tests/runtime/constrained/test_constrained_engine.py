"""Constrained decoding end to end through `loom.Engine`: every output matches its regex or
validates against its schema, on random tiny models at temperature 1.0, whatever else shares the
batch, through chunked prefill, retraction and every sampling mode."""

from __future__ import annotations

import gc
import json
import re
import time

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.protocol import GenerateRequest

from grammars import PERSON_SCHEMA as SCHEMA
from grammars import slow_gbnf


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    path = make_tiny_model("qwen2", vocab_size=512, seed=11)
    with LocalEngine(model_path=str(path), max_total_tokens=4096, debug_check_memory=True) as eng:
        yield eng


def fullmatch(regex: str, out: dict) -> None:
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
    assert re.fullmatch(regex, out["text"]), (regex, out["text"])


def validates(schema: dict, out: dict) -> None:
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out["meta_info"]["finish_reason"]
    jsonschema.validate(json.loads(out["text"]), schema)


def test_regex_and_schema_in_one_batch_with_a_free_request(engine):
    regex = r"(cat|dog)s? [0-9]{1,3}(\.[0-9]{2})?"
    outs = engine.generate(
        ["Pick:", "JSON:", "Free text"],
        [
            {"regex": regex, "temperature": 1.0, "max_new_tokens": 40, "seed": 1},
            {"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": 120, "seed": 2},
            {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True},
        ],
    )
    fullmatch(regex, outs[0])
    validates(SCHEMA, outs[1])
    assert outs[2]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_invalid_grammars_abort_alone(engine):
    free = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    outs = engine.generate(
        ["a", "b", "c", "d", "e"],
        [
            free,
            {"regex": "(unclosed", "max_new_tokens": 5},
            {"json_schema": json.dumps({"type": "number", "maximum": 3.5}), "max_new_tokens": 5},
            {"ebnf": 'root ::= "x" nope', "max_new_tokens": 5},
            {"regex": "[0-9]{2}", "temperature": 1.0, "max_new_tokens": 8},
        ],
    )
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert reasons[0] == {"type": "length", "length": 5}
    assert reasons[1]["type"] == "abort" and "(unclosed" in reasons[1]["message"]
    assert reasons[2]["type"] == "abort" and "'maximum'" in reasons[2]["message"]
    assert reasons[3]["type"] == "abort" and "ebnf" in reasons[3]["message"] and "'nope'" in reasons[3]["message"]
    assert outs[1]["output_ids"] == [] and outs[2]["output_ids"] == []
    fullmatch("[0-9]{2}", outs[4])
    assert engine.scheduler.grammar_queue == [] and not engine.scheduler.has_work()


@pytest.mark.parametrize(
    "knobs",
    [
        {"temperature": 0},
        {"temperature": 1.3, "top_k": 5},
        {"temperature": 1.0, "top_p": 0.5},
        {"temperature": 1.0, "min_p": 0.2},
        {"temperature": 1.0, "repetition_penalty": 1.5, "frequency_penalty": 1.0, "presence_penalty": 1.0},
        {"temperature": 1.0, "min_new_tokens": 3},
    ],
)
def test_every_sampling_mode_respects_the_grammar(engine, knobs):
    regex = r"[A-Z][a-z]{2,6}( [a-z]{1,5}){0,2}\."
    outs = engine.generate(["One", "Two", "Three"], {"regex": regex, "max_new_tokens": 40, "seed": 3, **knobs})
    for out in outs:
        fullmatch(regex, out)


def test_unicode_output_is_whole_characters(engine):
    regex = "(é|ü|✓|日本){1,4}!"
    outs = engine.generate(["u"] * 4, {"regex": regex, "temperature": 1.0, "max_new_tokens": 40})
    for out in outs:
        fullmatch(regex, out)


def test_eos_ends_the_request_at_a_final_state(engine):
    # "[a-z]{1,30}" may end after any letter: the random model picks EOS sometimes, and the
    # output must still match (EOS is trimmed from the text, kept as the matched token).
    regex = "[a-z]{1,30}"
    outs = engine.generate(["e"] * 8, [{"regex": regex, "temperature": 1.0, "max_new_tokens": 60, "seed": s} for s in range(8)])
    for out in outs:
        fullmatch(regex, out)
    eos = engine.scheduler.eos_token_ids
    for out in outs:
        ids = out["output_ids"]
        assert all(t not in eos for t in ids[:-1])


def test_streaming_a_schema(engine):
    chunks = list(engine.generate("s", {"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": 120}, stream=True))
    text = "".join(c["text"] for c in chunks)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_chunked_prefill_and_retraction_keep_grammar_state(make_tiny_model):
    path = make_tiny_model("llama", vocab_size=512, seed=12)
    regex = r"[a-z]{8,12}( [0-9]{1,4}){3,6}"
    with LocalEngine(
        model_path=str(path), max_total_tokens=160, chunked_prefill_size=16, max_running_requests=8, debug_check_memory=True
    ) as eng:
        prompts = [f"prompt number {i} " * 3 for i in range(8)]
        eng.scheduler.new_token_ratio = 0.0  # admit optimistically: decoding then outgrows the pool
        outs = eng.generate(prompts, {"regex": regex, "temperature": 1.0, "max_new_tokens": 48})
        assert eng.scheduler.stats["retracted"] > 0, "the pool is small enough to force retraction"
        for out in outs:
            fullmatch(regex, out)


def test_slow_compilation_times_out_without_stalling_others(engine):
    backend = engine.scheduler.get_grammar_backend()
    saved = backend.compile_timeout_s
    backend.compile_timeout_s = 0.2
    try:
        outs = engine.generate(["slow", "fast"], [{"ebnf": slow_gbnf(), "max_new_tokens": 20}, {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}])
    finally:
        backend.compile_timeout_s = saved
    assert outs[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert "longer than 0.2s" in outs[0]["meta_info"]["finish_reason"]["message"]
    assert outs[1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}


# ----------------------------------------------------------------------------- properties

_atoms = st.sampled_from(["a", "b", "xy", "[0-9]", "[a-c]", "é", "-", "(q|rs)", "[A-Z]"])
_quant = st.sampled_from(["", "?", "{1,3}", "{2}", "{0,2}"])
_regexes = st.lists(st.tuples(_atoms, _quant).map(lambda t: f"(?:{t[0]}){t[1]}" if t[1] else t[0]), min_size=1, max_size=6).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(regex=_regexes, seed=st.integers(0, 2**16))
def test_random_regexes_always_match(engine, regex, seed):
    out = engine.generate("r", {"regex": regex, "temperature": 1.0, "max_new_tokens": 64, "seed": seed})
    fullmatch(regex, out)


_leaf = st.one_of(
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
    st.builds(lambda lo, w: {"type": "integer", "minimum": lo, "maximum": lo + w}, st.integers(-50, 50), st.integers(0, 300)),
    st.builds(lambda vals: {"enum": vals}, st.lists(st.sampled_from(["x", "y z", 1, 2.5, None, True]), min_size=1, max_size=3, unique=True)),
    st.builds(lambda v: {"const": v}, st.sampled_from(["k", 7, False])),
    st.builds(lambda hi: {"type": ["integer", "null", "string"], "minimum": -3, "maximum": hi, "maxLength": 3}, st.integers(-3, 40)),
)
_schemas = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.builds(
            lambda props, n_req: {
                "type": "object",
                "properties": {f"p{i}": s for i, s in enumerate(props)},
                "required": [f"p{i}" for i in range(min(n_req, len(props)))],
            },
            st.lists(inner, min_size=1, max_size=3),
            st.integers(0, 3),
        ),
        st.builds(lambda item, n: {"type": "array", "items": item, "maxItems": n}, inner, st.integers(0, 2)),
    ),
    max_leaves=5,
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas, seed=st.integers(0, 2**16))
def test_random_schemas_always_validate(engine, schema, seed):
    out = engine.generate("j", {"json_schema": json.dumps(schema), "temperature": 1.0, "max_new_tokens": 200, "seed": seed})
    validates(schema, out)


def test_batches_without_grammars_build_no_mask(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a batch without grammars built a grammar mask")

    monkeypatch.setattr(type(engine.scheduler), "_grammar_mask", staticmethod(boom))
    out = engine.generate(["plain", "text"], {"temperature": 1.0, "max_new_tokens": 4, "ignore_eos": True})
    assert [o["meta_info"]["finish_reason"]["type"] for o in out] == ["length", "length"]


def test_abort_while_the_grammar_compiles(engine):
    from loom.runtime.messages import AbortReq, BatchTokenIDOut, TokenizedGenerateReq

    sched = engine.scheduler
    ids = engine.tokenizer.encode("abort me", add_special_tokens=False)
    engine.io.inbox.append(TokenizedGenerateReq(rid="g-abort", input_ids=ids, sampling_params={"regex": "[a-z]{3,9}!"}))
    engine.io.inbox.append(AbortReq("g-abort", "the client left"))
    sched.step()
    finals = [o for m in engine.io.outbox if isinstance(m, BatchTokenIDOut) for o in m.outputs if o.rid == "g-abort"]
    engine.io.outbox.clear()
    assert [o.finished_reason for o in finals] == [{"type": "abort", "message": "the client left"}]
    assert not sched.has_work()


def test_sparse_logits_give_the_tokens_of_the_full_lm_head(engine, monkeypatch):
    """On the CPU a grammar row that allows few tokens here (digits, an enum, the punctuation
    after a value) gets logits for those tokens only. Outputs, greedy and seeded at temperature
    1.0, are the tokens the full LM head gives."""
    import loom.runtime.scheduler.batch_runner as scheduler_module  # where _sparse_rows reads it

    runner = engine.scheduler.runner
    sparse_rows: list[int] = []
    full = runner.compute_logits_sparse

    def counting(hidden, allowed):
        sparse_rows.append(sum(ids is not None for ids in allowed))
        return full(hidden, allowed)

    monkeypatch.setattr(runner, "compute_logits_sparse", counting)
    regex = r"(cat|dog)s? [0-9]{1,3}(\.[0-9]{2})?"
    prompts = ["JSON:", "Person:", "Data:", "Pick:"]
    params = [{"json_schema": json.dumps(SCHEMA), "temperature": 1.0, "max_new_tokens": 120, "seed": s} for s in range(3)]
    params.append({"regex": regex, "temperature": 0, "max_new_tokens": 40})
    sparse = engine.generate(prompts, params)
    assert sparse_rows and max(sparse_rows) > 0
    for out in sparse[:3]:
        validates(SCHEMA, out)
    fullmatch(regex, sparse[3])

    monkeypatch.setattr(scheduler_module, "SPARSE_LOGITS_SHARE", 10**9)  # no row is sparse enough
    sparse_rows.clear()
    dense = engine.generate(prompts, params)
    assert not sparse_rows
    assert [o["output_ids"] for o in sparse] == [o["output_ids"] for o in dense]


def test_a_hostile_schema_is_answered_400_at_once_beside_a_small_request(engine):
    """Issue 19: `minLength 200000` held a compile thread for minutes; now it is refused before
    anything is built, naming the keyword and the limit, and the request beside it is served."""
    t0 = time.monotonic()
    outs = engine.generate(
        ["a", "b"],
        [
            {"json_schema": json.dumps({"type": "string", "minLength": 200000, "maxLength": 400000}), "max_new_tokens": 5},
            {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True},
        ],
    )
    assert time.monotonic() - t0 < 5
    reason = outs[0]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and reason["status_code"] == 400 and reason["param"] == "sampling_params.json_schema"
    assert "minLength 200000" in reason["message"] and "limit of 65536" in reason["message"]
    assert outs[1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    assert engine.scheduler.grammar_queue == [] and not engine.scheduler.has_work()


def test_an_aborted_requests_compile_stops(engine):
    """A request aborted while its grammar compiles leaves the queue, and its compilation stops."""
    backend = engine.scheduler.get_grammar_backend()
    before = backend.jobs.cancelled_count
    request = GenerateRequest(text="x", sampling_params={"ebnf": slow_gbnf(), "max_new_tokens": 4}, rid="slow-1")
    reqs, _states = engine.tokenizer_manager.tokenize(request, request.items())
    engine.scheduler.add_request(reqs[0])
    assert [r.rid for r, _, _ in engine.scheduler.grammar_queue] == ["slow-1"]
    engine.scheduler.abort_request("slow-1", "client left")
    gc.collect()
    t_end = time.monotonic() + 3
    while backend.jobs.in_flight() and time.monotonic() < t_end:
        time.sleep(0.02)
    assert backend.jobs.in_flight() == 0 and backend.jobs.cancelled_count == before + 1
    engine.scheduler.flush_outbox()
