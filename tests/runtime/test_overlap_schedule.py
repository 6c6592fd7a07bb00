"""Overlap scheduling (runtime/scheduler/overlap.py): the same tokens as the synchronous scheduler.

Each test runs one workload on two engines, overlap on and off, and compares every request's
tokens and finish reason (greedy ones also against Transformers). All engines check the KV-pool
invariant after every step (debug_check_memory) and must end with every slot returned.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.messages import AbortReq, BatchTokenIDOut, TokenizedGenerateReq
from loom.runtime.scheduler.overlap import FutureTokenMap


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("overlap"), arch="llama", vocab_size=512, seed=2)


@pytest.fixture(scope="module")
def hf(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.inference_mode()
def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    """The reference: greedy over Transformers' full forward (no cache), n tokens, EOS ignored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and loses much on busy cores
    try:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    finally:
        torch.set_num_threads(threads)
    return ids[len(prompt) :]


def make_engines(model_dir, **kw) -> dict[bool, LocalEngine]:
    kw.setdefault("max_total_tokens", 4096)
    kw.setdefault("dtype", "float32")  # greedy tokens are compared with Transformers' in fp32
    engines = {
        overlap: LocalEngine(model_path=str(model_dir), debug_check_memory=True, disable_overlap_schedule=not overlap, **kw)
        for overlap in (True, False)
    }
    assert engines[True].scheduler.overlap and not engines[False].scheduler.overlap
    return engines


def record_finishes(engine: LocalEngine) -> list[tuple[str, str, int]]:
    """(rid, finish type, launched steps not yet processed) for every request the scheduler finishes."""
    sched, seen = engine.scheduler, []
    finish = sched.finish

    def recording_finish(req, reason):
        seen.append((req.rid, reason["type"], req.inflight))
        finish(req, reason)

    sched.finish = recording_finish
    return seen


def assert_idle_and_returned(engine: LocalEngine) -> None:
    sched = engine.scheduler
    assert not sched.has_work()
    report = sched.memory_report()
    assert report["held"] == 0 and report["protected"] == 0, report
    assert report["free"] + report["evictable"] == report["capacity"], report
    assert sched.req_to_token_pool.available_size() == sched.req_to_token_pool.size
    assert engine.flush_cache() and sched.allocator.available_size() == report["capacity"]


def prompts_of(seed: int, count: int, lo: int, hi: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def test_future_token_map_resolves_refs_to_stored_ids():
    fmap = FutureTokenMap(max_batch=3, device=torch.device("cpu"))
    a = fmap.reserve(3)
    fmap.store(a, torch.tensor([7, 8, 9]))
    b = fmap.reserve(2)
    assert b == a + 3  # the next step's entries never overlap the previous step's
    ids = torch.tensor([fmap.ref(a + 2), 42, fmap.ref(a)])
    assert fmap.resolve(ids).tolist() == [9, 42, 7]
    for _ in range(10):  # the ring restarts at 0 instead of splitting a step's entries
        start = fmap.reserve(3)
        assert 0 <= start and start + 3 <= fmap.size


def test_mixed_workload_matches_sync_and_transformers(model_dir, hf):
    prompts = prompts_of(0, 7, 3, 40)
    ref = [hf_greedy(hf, p, n) for p, n in zip(prompts, (12, 20, 1, 8, 4, 2))]
    engines = make_engines(model_dir)
    stop_text = engines[True].tokenizer.decode(ref[3][6:8])  # text request 3 produces after 6 tokens
    assert stop_text.strip()
    greedy = {"temperature": 0}
    params = [
        {**greedy, "max_new_tokens": 12, "ignore_eos": True},
        {**greedy, "max_new_tokens": 20, "ignore_eos": True},
        {**greedy, "max_new_tokens": 1, "ignore_eos": True},
        {**greedy, "max_new_tokens": 20, "stop": [stop_text]},
        {**greedy, "max_new_tokens": 20, "stop_token_ids": [ref[4][3]]},
        {**greedy, "max_new_tokens": 14, "min_new_tokens": 10, "stop_token_ids": [ref[5][1]]},
        {**greedy, "max_new_tokens": 16},  # may meet EOS
        {"regex": "[a-z]{3,12}", "max_new_tokens": 4, **greedy},  # a grammar in the batch: synchronous steps
        # n > 1 as the HTTP API expands it: one request per sample; seeded, so reproducible.
        *({"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 18, "seed": s, "ignore_eos": True} for s in (1, 2, 3)),
    ]
    all_prompts = prompts[:7] + [prompts[2]] + [prompts[6]] * 3
    logprob = [i == 4 for i in range(len(params))]  # logprobs: synchronous while that request runs
    outs = {}
    for engine in engines.values():  # the regex compiled beforehand: its request joins the batch at once, not
        engine.generate(input_ids=prompts[2], sampling_params=params[7])  # whenever a compile thread is done
    finishes = record_finishes(engines[True])
    try:
        for overlap, engine in engines.items():
            outs[overlap] = engine.generate(input_ids=all_prompts, sampling_params=params, return_logprob=logprob)
            # The grammar and logprob requests finish early; the rest of the batch then overlaps.
            assert (engine.scheduler.stats["overlap_decode_steps"] > 0) == overlap
            assert_idle_and_returned(engine)
    finally:  # a failure must not leave the forward threads to the next test (it checks none is left)
        for engine in engines.values():
            engine.shutdown()
    for i, (on, off) in enumerate(zip(outs[True], outs[False])):
        assert on["output_ids"] == off["output_ids"], f"request {i} differs with overlap on"
        assert on["meta_info"]["finish_reason"] == off["meta_info"]["finish_reason"], i
    # Stop tokens / strings are met while the request's next step runs: its token is dropped.
    assert any(kind == "stop" and inflight for _, kind, inflight in finishes), finishes
    on = outs[True]
    for i, n in ((0, 12), (1, 20), (2, 1)):
        assert on[i]["output_ids"] == ref[i][:n], f"request {i} diverged from Transformers"
    assert on[4]["output_ids"] == ref[4][:4] and on[4]["meta_info"]["finish_reason"]["matched"] == ref[4][3]
    assert len(on[5]["output_ids"]) >= 10 and ref[5][1] not in on[5]["output_ids"][:10]  # banned until min_new_tokens
    assert on[3]["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_text}
    assert on[3]["output_ids"] == ref[3][: len(on[3]["output_ids"])] and len(on[3]["output_ids"]) <= 8
    lp_on, lp_off = (o[4]["meta_info"]["output_token_logprobs"] for o in (outs[True], outs[False]))
    assert [t[1] for t in lp_on] == [t[1] for t in lp_off] == ref[4][:4]
    assert [t[0] for t in lp_on] == pytest.approx([t[0] for t in lp_off], abs=1e-5)
    for engine in engines.values():
        engine.shutdown()


def run_script(engine: LocalEngine, script: dict[int, list], max_steps: int = 400) -> tuple[dict, dict, dict]:
    """Step the scheduler by hand, feeding each step's messages first -> (tokens, finals, reasons) by rid."""
    sched, io = engine.scheduler, engine.io
    tokens: dict[str, list[int]] = {}
    finals: dict[str, int] = {}
    reasons: dict[str, dict] = {}
    for step in range(max_steps):
        io.inbox.extend(script.get(step, []))
        if step > max(script) and not sched.has_work() and not io.inbox:
            break
        sched.step()
        while io.outbox:
            msg = io.outbox.popleft()
            assert isinstance(msg, BatchTokenIDOut)
            for out in msg.outputs:
                assert finals.get(out.rid, 0) == 0, f"{out.rid} got output after its final answer"
                tokens.setdefault(out.rid, []).extend(out.new_token_ids)
                if out.finished_reason is not None:
                    finals[out.rid] = finals.get(out.rid, 0) + 1
                    reasons[out.rid] = out.finished_reason
    return tokens, finals, reasons


def submit(rid: str, prompt: list[int], **params) -> TokenizedGenerateReq:
    stream = params.pop("stream", False)
    return TokenizedGenerateReq(rid=rid, input_ids=prompt, sampling_params={"temperature": 0, **params}, stream=stream)


def test_staggered_streams_and_an_abort_mid_decode(model_dir, hf):
    prompts = prompts_of(1, 6, 4, 30)
    script = {
        0: [submit("a", prompts[0], max_new_tokens=25, ignore_eos=True, stream=True),
            submit("b", prompts[1], max_new_tokens=25, ignore_eos=True)],
        3: [submit("c", prompts[2], max_new_tokens=10, ignore_eos=True, stream=True),
            submit("gone", prompts[3], max_new_tokens=40, ignore_eos=True, stream=True)],
        9: [AbortReq("gone", "the client left")],
        10: [submit("d", prompts[4], max_new_tokens=6, ignore_eos=True, stream=True)],
        12: [AbortReq("d", "the client left")],
        14: [submit("e", prompts[0] + prompts[5], max_new_tokens=8, ignore_eos=True)],  # shares a's prefix
    }  # fmt: skip
    engines = make_engines(model_dir)
    finishes = record_finishes(engines[True])
    results = {overlap: run_script(engine, script) for overlap, engine in engines.items()}
    assert {rid for rid, kind, inflight in finishes if kind == "abort" and inflight} == {"gone", "d"}  # mid-step
    for overlap, (tokens, finals, reasons) in results.items():
        assert finals == {rid: 1 for rid in "a b c gone d e".split()}, finals
        assert reasons["gone"]["type"] == "abort" and len(tokens["gone"]) < 40
        assert_idle_and_returned(engines[overlap])
    (on, _, on_reasons), (off, _, off_reasons) = results[True], results[False]
    for rid, prompt, n in (("a", prompts[0], 25), ("b", prompts[1], 25), ("c", prompts[2], 10), ("e", prompts[0] + prompts[5], 8)):
        assert on[rid] == off[rid] == hf_greedy(hf, prompt, n), rid
        assert on_reasons[rid] == off_reasons[rid] == {"type": "length", "length": n}
    assert engines[True].scheduler.stats["overlap_decode_steps"] > 0
    for engine in engines.values():
        engine.shutdown()


def test_small_kv_pool_retracts_and_keeps_tokens(model_dir, hf):
    prompts = prompts_of(2, 8, 6, 14)
    params = {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True}
    engines = make_engines(model_dir, max_total_tokens=160, chunked_prefill_size=32, max_running_requests=8)
    outs = {}
    for overlap, engine in engines.items():
        outs[overlap] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
        assert engine.scheduler.stats["retracted"] > 0, "the pool was meant to be too small for the batch"
        assert_idle_and_returned(engine)
        engine.shutdown()
    assert outs[True] == outs[False]
    assert outs[True][:2] == [hf_greedy(hf, p, 30) for p in prompts[:2]]


def test_failed_step_aborts_its_requests_and_engine_keeps_serving(model_dir):
    engine = make_engines(model_dir)[True]
    runner = engine.model_runner
    forward = runner.forward
    failed = []

    def flaky_forward(fb):
        if threading.current_thread().name.startswith("loom-forward") and not failed:
            failed.append(fb.batch_size)
            raise RuntimeError("injected device failure")
        return forward(fb)

    runner.forward = flaky_forward
    # 8 tokens: the failed step is processed while the next one runs; 2 tokens: it is the last one.
    for max_new in (8, 2):
        failed.clear()
        outs = engine.generate(input_ids=prompts_of(3, 3, 4, 10), sampling_params={"max_new_tokens": max_new, "ignore_eos": True})
        assert failed == [3]
        for out in outs:
            reason = out["meta_info"]["finish_reason"]
            assert reason["type"] == "abort" and "injected device failure" in reason["message"], reason
            assert len(out["output_ids"]) == 1  # the prefill's token; the failed step's never came
        assert_idle_and_returned(engine)
    again = engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 5, "ignore_eos": True, "temperature": 0})
    assert again["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert_idle_and_returned(engine)
    engine.shutdown()
    assert not [t for t in threading.enumerate() if t.name.startswith("loom-forward")], "shutdown stops the forward thread"


def test_overlap_flag_on_the_command_line():
    from loom.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve", "--model", "m"]).disable_overlap_schedule is None  # the device decides
    assert parser.parse_args(["serve", "--model", "m", "--disable-overlap-schedule"]).disable_overlap_schedule is True
    assert parser.parse_args(["serve", "--model", "m", "--no-disable-overlap-schedule"]).disable_overlap_schedule is False
