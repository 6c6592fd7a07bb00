"""A decode step after a jump-forward on the CPU (runtime/scheduler/batch_runner.py, `catches_up`):
rows a jump-forward left several tokens without KV compute one of them per step and sample nothing
until they reach their last, while the other rows decode, one fused call per step, instead of one
extend over every pending token through the torch path. Each request must get the extend's hidden
state at its last pending token (fp32: summation order only), the same KV for every pending
token, and so the same greedy token."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler.schedule_batch import Req, build_extend_batch

from gguf_files import Q, write_gguf

PROMPTS = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7, 61, 200, 13], [77, 3]]
PENDING = [[11, 12, 13], [14], [15, 16]]  # tokens without KV yet, as a jump-forward leaves them


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("catch_up") / "model.gguf", "llama", [Q.Q4_1], seed=5)
    with LocalEngine(model_path=str(path), quantization="auto", dtype="float32", max_total_tokens=1024) as engine:
        assert engine.model_runner.cpu_decode is not None, "the fused decode step is what this tests"
        yield engine


def prefilled(engine) -> list[Req]:
    """Running requests whose prompts have KV, each then holding its PENDING tokens without KV."""
    s = engine.scheduler
    reqs = [Req(f"r{i}", list(p), SamplingParams(temperature=0)) for i, p in enumerate(PROMPTS)]
    for req in reqs:
        req.req_pool_idx = s.req_to_token_pool.alloc(1)[0]
        req.extend_input_len = len(req.origin_input_ids)
    slots = s.allocator.alloc(sum(len(p) for p in PROMPTS))
    s.runner.forward(build_extend_batch(reqs, slots, s.req_to_token_pool.req_to_token).forward_batch)
    for req, pending in zip(reqs, PENDING):
        req.kv_len = len(req.origin_input_ids)
        req.output_ids = list(pending)
    s.running = list(reqs)
    return reqs


def stored_kv(engine, req: Req) -> torch.Tensor:
    """K and V of the request's pending tokens, every layer: [L, 2, len(PENDING[i]), Hkv, D]."""
    pool = engine.model_runner.token_to_kv_pool
    start = len(req.origin_input_ids)
    slots = engine.scheduler.req_to_token_pool.req_to_token[req.req_pool_idx][start : start + len(req.output_ids)]
    return torch.stack([torch.stack([pool.k_buffer[i][slots], pool.v_buffer[i][slots]]) for i in range(len(pool.k_buffer))])


def release(engine, reqs: list[Req]) -> None:
    s = engine.scheduler
    for req in reqs:
        s.allocator.free(s.req_to_token_pool.req_to_token[req.req_pool_idx][: req.kv_len].clone())
        s.req_to_token_pool.free(req.req_pool_idx)
    s.running = []


def test_caught_up_rows_get_the_extends_hidden_states_kv_and_tokens(engine, monkeypatch):
    s = engine.scheduler
    calls: list[int] = []
    replay = s.runner.cpu_decode.replay
    monkeypatch.setattr(s.runner.cpu_decode, "replay", lambda fb: calls.append(fb.batch_size) or replay(fb))
    hidden: dict[str, torch.Tensor] = {}
    sample = s._decode_sample

    def record(reqs, h):
        for i, r in enumerate(reqs):
            hidden.setdefault(r.rid, h[i].clone())  # at its first sample: its last pending token
        sample(reqs, h)

    monkeypatch.setattr(s, "_decode_sample", record)
    got = {}
    for catch_up in (False, True):
        monkeypatch.setattr(s, "catches_up", lambda reqs, on=catch_up: on and any(r.pending_len > 1 for r in reqs))
        calls.clear()
        hidden.clear()
        reqs = prefilled(engine)
        sampled_per_step = []
        while any(len(r.output_ids) == len(p) for r, p in zip(reqs, PENDING)):
            slots = s.allocator.alloc(s.decode_slots(reqs))
            s.run_decode(reqs, slots)
            sampled_per_step.append([len(r.output_ids) > len(p) for r, p in zip(reqs, PENDING)])
        tokens = [r.output_ids[len(p)] for r, p in zip(reqs, PENDING)]
        kv = [stored_kv(engine, r)[:, :, : len(p)] for r, p in zip(reqs, PENDING)]
        got[catch_up] = (tokens, [hidden[r.rid] for r in reqs], kv)
        if catch_up:  # one token per row and step, each row samples once its last pending token is in
            assert calls == [3, 3, 3]
            assert sampled_per_step == [[False, True, False], [False, True, True], [True, True, True]]
            assert [r.kv_len for r in reqs] == [4 + 3, 9 + 1 + 2, 2 + 2 + 1]  # + the steps since its sample
        else:
            assert calls == [] and sampled_per_step == [[True, True, True]]  # one extend
            assert [r.kv_len for r in reqs] == [len(p) + len(q) for p, q in zip(PROMPTS, PENDING)]
        release(engine, reqs)
    (tokens, hid, kv), (want_tokens, want_hid, want_kv) = got[True], got[False]
    for a, b in zip(hid + kv, want_hid + want_kv):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert tokens == want_tokens


def test_decode_slots_and_where_rows_catch_up(engine):
    """A step with jump-forwarded tokens takes one slot per row where the fused step runs it, else
    one per pending token (the extend); a step without them is a plain decode step."""
    s = engine.scheduler
    reqs = prefilled(engine)
    try:
        assert s.catches_up(reqs) and s.decode_slots(reqs) == 3
        for req in reqs:
            req.kv_len = req.fill_len - 1
        assert not s.catches_up(reqs) and s.decode_slots(reqs) == 3
        for req in reqs:
            req.kv_len = len(req.origin_input_ids)
        fused = s.runner.cpu_decode
        s.runner.cpu_decode = None  # the torch path: the extend computes every pending token
        assert not s.catches_up(reqs) and s.decode_slots(reqs) == 6
    finally:
        s.runner.cpu_decode = fused
        release(engine, reqs)
