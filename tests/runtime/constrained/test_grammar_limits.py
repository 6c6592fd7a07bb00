"""Grammar compilation bounded in size, time and memory (issue 19): sources past a limit are refused
up front naming the keyword and the limit, a compile past its budget or wanted by nobody stops
(its thread stops burning CPU), and the caches stay within their bounds."""

from __future__ import annotations

import gc
import json
import random
import sys
import time

import pytest

from loom.runtime.constrained import ErrorKind, GrammarBackend, GrammarError, allocate_token_bitmask, unpack_bitmask
from loom.runtime.constrained.compile_jobs import CompileCancelled, CompileJobs, CompileStopped
from loom.runtime.constrained.ebnf import gbnf_tables, lark_tables
from loom.runtime.constrained.limits import GrammarLimits, check_source
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.server_args import EngineArgumentError, ServerArgs

from byte_vocab import BYTES, EOS, V
from grammars import slow_gbnf

HOSTILE = json.dumps({"type": "string", "minLength": 200000, "maxLength": 400000})  # issue 19's 58-byte schema


def refused(kind: str, source: str, limits: GrammarLimits | None = None) -> str:
    with pytest.raises(GrammarError) as info:
        check_source(kind, source, limits or GrammarLimits())
    assert info.value.kind is ErrorKind.TOO_LARGE
    return str(info.value)


def test_limits_name_the_keyword_the_value_and_the_limit():
    msg = refused("json_schema", HOSTILE)
    assert "minLength" in msg and "200000" in msg and "65536" in msg and "GrammarLimits.max_string_length" in msg
    assert "--grammar-max-string-length" in msg  # the flag that raises it
    msg = refused("json_schema", json.dumps({"type": "object", "properties": {"xs": {"type": "array", "maxItems": 10**9}}}))
    assert "maxItems" in msg and "#/properties/xs" in msg and "max_items" in msg
    msg = refused("json_schema", json.dumps({"type": "string", "pattern": "^a{0,100001}$"}))
    assert "'pattern'" in msg and "{0,100001}" in msg and "max_repeat" in msg
    assert "max_regex_size" in refused("regex", "((a{1000}){1000}){1000}")
    assert "max_repeat" in refused("regex", "[0-9]{50000}")
    deep: dict = {"type": "string"}
    for _ in range(200):
        deep = {"type": "array", "items": deep}
    assert "max_nesting" in refused("json_schema", json.dumps(deep))
    assert "max_nesting" in refused("json_schema", "[" * 100_000 + "]" * 100_000)
    assert "max_source_chars" in refused("regex", "a" * 2001, GrammarLimits(max_source_chars=2000))
    # grammars nested past the limit (their readers recurse per level: ~300 levels raised RecursionError)
    msg = refused("lark", "start: " + "([" * 65 + "A" + "])" * 65 + '\nA: "a"')
    assert "lark: groups nested 130" in msg and "max_nesting" in msg
    assert "ebnf: groups nested 129" in refused("ebnf", "root ::= " + "(" * 129 + '"a"' + ")" * 129)


def test_what_looks_like_nesting_in_literals_classes_and_regexes_is_not_counted():
    opens = "(" * 200
    check_source("ebnf", f'root ::= "{opens}" [(\\]] x # {opens}\nx ::= ("a")', GrammarLimits())
    check_source("lark", f'start: "{opens}" /[(]+/ A // {opens}\nA: "a"', GrammarLimits())
    n = GrammarLimits().max_nesting  # and what the limit lets through compiles (no RecursionError)
    for lark_source in [
        "start: " + "([" * (n // 2) + "A" + "])" * (n // 2) + '\nA: "a"',
        "start: " + "(" * n + "A" + ")" * n + '\nA: "a"\n%declare B',
    ]:
        check_source("lark", lark_source, GrammarLimits())
        assert lark_tables(lark_source).terminals  # (the second outside lark_plain's subset: Lark's loader)
    assert gbnf_tables("root ::= " + "(" * n + '"a"' + ")" * n).terminals


def test_the_limits_are_engine_arguments(make_tiny_model):
    """`grammar_*` engine arguments (`loom serve --grammar-*` flags) set the limits the scheduler's
    backend checks; a limit that is not positive is refused before anything starts."""
    with pytest.raises(EngineArgumentError, match="--grammar-max-items"):
        ServerArgs(model_path="x", grammar_max_items=0)
    path = make_tiny_model("qwen2", vocab_size=512, seed=11)
    with LocalEngine(model_path=str(path), max_total_tokens=2048, grammar_max_string_length=100) as eng:
        schema = json.dumps({"type": "string", "maxLength": 200})
        refused = eng.generate("x", {"json_schema": schema, "max_new_tokens": 4})["meta_info"]["finish_reason"]
        assert refused["status_code"] == 400 and refused["param"] == "sampling_params.json_schema"
        assert "maxLength 200 at # exceeds the limit of 100" in refused["message"] and "--grammar-max-string-length" in refused["message"]
        ok = eng.generate("x", {"json_schema": json.dumps({"type": "string", "maxLength": 50}), "max_new_tokens": 4})
        assert ok["meta_info"]["completion_tokens"] <= 4


def test_sizes_within_the_limits_pass_the_check():
    for kind, source in [
        ("json_schema", json.dumps({"type": "string", "maxLength": 65535})),
        ("json_schema", json.dumps({"type": "array", "maxItems": 1000, "items": {"type": "string", "pattern": "^[a-z]{1,255}$"}})),
        ("json_schema", json.dumps({"enum": ["x" * 100_000]})),  # values are not sizes
        ("regex", "[0-9]{1,1000}(\\.[0-9]+)?"),
        ("ebnf", 'root ::= "a"{1000}'),
        ("ebnf", "root ::= " + "(" * 128 + '"a"' + ")" * 128),
    ]:
        check_source(kind, source, GrammarLimits())


@pytest.fixture
def backend():
    b = GrammarBackend(BYTES, V, frozenset({EOS}))
    yield b
    b.shutdown()


def test_the_hostile_schema_is_refused_at_once_and_a_small_one_compiles_beside_it(backend):
    t0 = time.monotonic()
    hostile = backend.compile("json_schema", HOSTILE)
    small = backend.compile("json_schema", json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}))
    with pytest.raises(GrammarError, match="maxLength 400000|minLength 200000") as info:
        hostile.result(timeout=5)
    assert info.value.kind is ErrorKind.TOO_LARGE
    assert time.monotonic() - t0 < 1.0
    m = small.result(timeout=30).matcher()
    for b in b'{"n":42}':
        assert m.accept_token(b + 1)
    assert m.accept_token(EOS)


def _spinner(counter: list[int], stop_after: float = 60.0):
    def spin() -> str:
        t_end = time.monotonic() + stop_after
        while time.monotonic() < t_end:  # pure Python, checks nothing: only an injected exception stops it
            counter[0] += 1
        return "finished"

    return spin


def _stops_counting(counter: list[int], within_s: float = 2.0) -> bool:
    t_end = time.monotonic() + within_s
    while time.monotonic() < t_end:
        before = counter[0]
        time.sleep(0.1)
        if counter[0] == before:
            return True
    return False


def test_a_compile_past_its_budget_stops_and_its_thread_is_reused():
    jobs = CompileJobs(1)
    counter = [0]
    ticket = jobs.submit("slow", _spinner(counter), timeout_s=0.2)
    with pytest.raises(CompileStopped, match="took longer than 0.2s"):
        ticket.result(timeout=5)
    assert _stops_counting(counter), "the compile thread kept running after its budget"
    assert jobs.submit("next", lambda: 7, timeout_s=5).result(timeout=5) == 7  # the same single thread, unharmed
    jobs.shutdown()


def test_compile_threads_run_torch_on_one_openmp_thread_and_leave_the_scheduler_s_alone():
    """A compile thread's torch ops must not start a second OpenMP team: with more OpenMP threads than
    cores, libgomp stops spinning for every team and the model's steps slow down for everyone (one
    xgrammar compile cost decoding 25%)."""
    import torch

    before = torch.get_num_threads()
    jobs = CompileJobs(1)

    def job() -> int:
        torch.zeros(1 << 18).add_(1)  # big enough for a parallel region
        return torch.get_num_threads()

    assert jobs.submit("torch", job, timeout_s=10).result(timeout=10) == 1
    assert torch.get_num_threads() == before  # the calling (scheduler's) thread keeps its own
    jobs.shutdown()


class _Finaliser:
    def __del__(self):  # Python code a stop can land in: Python prints what a finaliser raises, and drops it
        for _ in range(50):
            pass


def _finalising_spinner(counter):
    def run():
        while True:
            _Finaliser()
            for _ in range(50):
                counter[0] += 1

    return run


def test_a_stop_that_lands_in_a_finaliser_is_neither_printed_nor_lost(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # what Python would print as "Exception ignored in"
    jobs = CompileJobs(1)
    counter = [0]
    ticket = jobs.submit("finalisers", _finalising_spinner(counter), timeout_s=0.2)
    with pytest.raises(CompileStopped, match="took longer than 0.2s"):
        ticket.result(timeout=5)
    assert _stops_counting(counter), "the compile kept running after a stop landed in a finaliser"
    assert not [u for u in seen if issubclass(u.exc_type, CompileCancelled)], "a stop was reported as an unraisable error"
    jobs.shutdown()


def test_a_compile_nobody_waits_for_stops():
    jobs = CompileJobs(1)
    counter = [0]
    ticket = jobs.submit("slow", _spinner(counter), timeout_s=60)
    t_end = time.monotonic() + 5
    while counter[0] == 0 and time.monotonic() < t_end:
        time.sleep(0.01)
    assert counter[0] > 0
    del ticket  # the request was aborted: the scheduler dropped its future
    gc.collect()
    assert _stops_counting(counter), "an abandoned compile kept running"
    assert jobs.cancelled_count == 1 and jobs.in_flight() == 0
    jobs.shutdown()


def test_a_shared_compile_runs_while_any_ticket_is_held():
    jobs = CompileJobs(1)
    counter = [0]
    first = jobs.submit("k", _spinner(counter, stop_after=0.3), timeout_s=30)
    second = jobs.submit("k", _spinner(counter, stop_after=0.3), timeout_s=30)  # the same key: one run
    del first
    gc.collect()
    assert second.result(timeout=10) == "finished"
    assert jobs.cancelled_count == 0
    jobs.shutdown()


def test_a_real_compile_past_the_timeout_stops_cpu_work():
    backend = GrammarBackend(BYTES, V, frozenset({EOS}), compile_timeout_s=0.3)
    slow = slow_gbnf()  # ~1.6 s of compile
    fut = backend.compile("ebnf", slow)
    with pytest.raises(GrammarError, match="took longer than 0.3s"):
        fut.result(timeout=10)
    t_cpu, t_wall = time.process_time(), time.monotonic()
    time.sleep(0.5)
    assert time.process_time() - t_cpu < 0.25, "the process kept computing after the compile was stopped"
    assert time.monotonic() - t_wall >= 0.5
    again = backend.compile("ebnf", slow)  # a stopped compile is not cached: it is tried anew
    assert again is not fut
    backend.shutdown()


def test_a_regex_whose_whole_automaton_is_past_the_bound_is_served_lazily(backend):
    """2^17 DFA states whole (built eagerly, refused past 50k): the backend builds those its masks
    reach, and the text it allows is the regex's."""
    import re

    compiled = backend.compile("regex", "(a|b)*a(a|b){16}").result(timeout=10)
    assert compiled.num_states < 100  # the start's mask reached a handful
    g, row, rng = compiled.matcher(), allocate_token_bitmask(1, V), random.Random(0)
    text = bytearray()
    for _ in range(60):
        g.fill_mask(row[0])
        ids = set(unpack_bitmask(row, V)[0].nonzero().view(-1).tolist())
        assert ids - {EOS} == {1 + ord("a"), 1 + ord("b")}  # any a or b, always (an a 17 bytes back ends it)
        assert (EOS in ids) == bool(re.fullmatch(rb"(a|b)*a(a|b){16}", bytes(text)))
        token = rng.choice(sorted(ids - {EOS}))
        assert g.accept_token(token)
        text += BYTES[token]
    assert compiled.num_states < 2000


def test_caches_stay_within_count_and_bytes(backend):
    small = GrammarBackend(BYTES, V, frozenset({EOS}), cache_size=8)
    for i in range(40):
        small.compile("regex", f"[a-z]{{{i},{i + 3}}}").result(timeout=30)
    assert len(small._cache) <= 8
    tight = GrammarBackend(BYTES, V, frozenset({EOS}), cache_bytes=200_000)
    for i in range(40):
        compiled = tight.compile("regex", f"[a-z]{{{i},{i + 30}}}").result(timeout=30)
        assert compiled.nbytes > 0  # its table and the masks computed so far
    assert tight.cached_bytes() <= 200_000
    small.shutdown()
    tight.shutdown()
