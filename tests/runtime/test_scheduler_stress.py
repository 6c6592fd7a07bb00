"""Random arrivals, aborts and tight memory against the scheduler loop.

Checks, over many random schedules: the KV-pool invariant after every step (debug_check_memory),
exactly one final answer per request, no request lost, and memory fully returned at the end.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.messages import AbortReq, BatchTokenIDOut, TokenizedGenerateReq


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("stress"), arch="llama", vocab_size=320, seed=6)
    built = {
        radix_off: LocalEngine(
            model_path=str(path),
            max_total_tokens=120,
            chunked_prefill_size=32,
            max_running_requests=6,
            debug_check_memory=True,
            disable_radix_cache=radix_off,
        )
        for radix_off in (False, True)
    }
    yield built


op = st.one_of(
    st.tuples(st.just("submit"), st.integers(0, 3), st.integers(1, 40), st.integers(0, 20)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, min_size=1, max_size=30), radix_off=st.booleans(), seed=st.integers(0, 2**16))
def test_every_request_gets_exactly_one_final_answer(engines, ops, radix_off, seed):
    engine = engines[radix_off]
    sched = engine.scheduler
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 250) for _ in range(rng.randint(0, 30))] for _ in range(4)]
    submitted: list[str] = []
    finals: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}

    def drain() -> None:
        while engine.io.outbox:
            msg = engine.io.outbox.popleft()
            if isinstance(msg, BatchTokenIDOut):
                for out in msg.outputs:
                    tokens.setdefault(out.rid, []).extend(out.new_token_ids)
                    if out.finished_reason is not None:
                        finals[out.rid] = finals.get(out.rid, 0) + 1

    for i, action in enumerate(ops):
        if action[0] == "submit":
            _, prefix, length, new = action
            prompt = prefixes[prefix] + [rng.randrange(3, 250) for _ in range(length)]
            rid = f"r{seed}-{i}"
            params = {"max_new_tokens": new, "temperature": rng.choice([0.0, 1.0]), "ignore_eos": rng.random() < 0.5}
            engine.io.inbox.append(TokenizedGenerateReq(rid=rid, input_ids=prompt, sampling_params=params))
            submitted.append(rid)
        elif action[0] == "step":
            for _ in range(action[1]):
                sched.step()
                drain()
        elif submitted:
            engine.io.inbox.append(AbortReq(submitted[action[1] % len(submitted)]))
    for _ in range(2000):
        if not sched.has_work() and not engine.io.inbox:
            break
        sched.step()
        drain()
    assert not sched.has_work(), "the scheduler stopped with requests still inside"
    assert sorted(finals) == sorted(submitted), "some request never got its final answer"
    assert all(n == 1 for n in finals.values()), f"a request got more than one final answer: {finals}"
    report = sched.memory_report()
    assert report["held"] == 0 and report["protected"] == 0
    assert report["free"] + report["evictable"] == report["capacity"]
