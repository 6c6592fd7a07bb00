"""A decode step after a jump-forward on the CPU (runtime/scheduler/batch_runner.py,
`_forward_in_rounds`): rows holding several pending tokens run as rounds of fused decode calls
instead of one extend through the torch path. Each row's last hidden state and the KV stored for
every pending token must be what the extend gives (fp32: summation order only), and so must the
greedy token run_decode picks, with the rounds on and off."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler import batch_runner
from loom.runtime.scheduler.schedule_batch import Req, build_extend_batch

from gguf_files import Q, write_gguf

PROMPTS = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7, 61, 200, 13], [77, 3]]
PENDING = [[11, 12, 13], [14], [15, 16]]  # tokens without KV yet, as a jump-forward leaves them


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = write_gguf(tmp_path_factory.mktemp("rounds") / "model.gguf", "llama", [Q.Q4_1], seed=5)
    with LocalEngine(model_path=str(path), quantization="auto", dtype="float32", max_total_tokens=1024) as engine:
        assert engine.model_runner.cpu_decode is not None, "the fused decode step is what this tests"
        yield engine


def prefilled(engine) -> list[Req]:
    """Requests whose prompts have KV, each then holding its PENDING tokens without KV."""
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
    return reqs


def release(engine, reqs: list[Req]) -> None:
    s = engine.scheduler
    for req in reqs:
        s.allocator.free(s.req_to_token_pool.req_to_token[req.req_pool_idx][: req.kv_len].clone())
        s.req_to_token_pool.free(req.req_pool_idx)
    s.running = []


def stored_kv(engine, slots: torch.Tensor) -> torch.Tensor:
    pool = engine.model_runner.token_to_kv_pool
    return torch.stack([torch.stack([pool.k_buffer[i][slots], pool.v_buffer[i][slots]]) for i in range(len(pool.k_buffer))])


def test_rounds_give_the_extends_hidden_states_and_kv(engine):
    s = engine.scheduler
    reqs = prefilled(engine)
    slots = s.allocator.alloc(sum(r.pending_len for r in reqs))
    try:
        plan = build_extend_batch(reqs, slots, s.req_to_token_pool.req_to_token, from_kv_len=True)
        want = s.runner.forward(plan.forward_batch)[plan.logit_rows].clone()  # [B, H]
        want_kv = stored_kv(engine, slots)
        for layer in range(len(engine.model_runner.token_to_kv_pool.k_buffer)):  # the rounds must write it all again
            engine.model_runner.token_to_kv_pool.k_buffer[layer][slots] = 0
            engine.model_runner.token_to_kv_pool.v_buffer[layer][slots] = 0
        got = s._forward_in_rounds(reqs, slots, max(len(p) for p in PENDING))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(stored_kv(engine, slots), want_kv, rtol=1e-4, atol=1e-4)
        assert [r.kv_len for r in reqs] == [len(p) for p in PROMPTS], "kv_len moves in run_decode, after the step"
    finally:
        s.allocator.free(slots)
        release(engine, reqs)


def test_run_decode_samples_the_extends_tokens(engine, monkeypatch):
    """run_decode with the rounds on (3) and off (0: the extend) samples the same greedy tokens,
    and each takes the path it says (one fused call per round, or none)."""
    s = engine.scheduler
    calls = []
    replay = s.runner.cpu_decode.replay
    monkeypatch.setattr(s.runner.cpu_decode, "replay", lambda fb: calls.append(fb.batch_size) or replay(fb))
    tokens = {}
    for rounds in (3, 0):
        monkeypatch.setattr(batch_runner, "MAX_DECODE_ROUNDS", rounds)
        calls.clear()
        reqs = prefilled(engine)
        slots = s.allocator.alloc(sum(r.pending_len for r in reqs))
        s.running = list(reqs)
        s.run_decode(reqs, slots)
        tokens[rounds] = [r.output_ids[len(p)] for r, p in zip(reqs, PENDING)]
        assert calls == ([1, 2, 3] if rounds else [])  # the row with 3 pending, then those with 2 or more, then all
        assert [r.kv_len for r in reqs] == [len(p) + len(q) for p, q in zip(PROMPTS, PENDING)]
        release(engine, reqs)
    assert tokens[3] == tokens[0]
