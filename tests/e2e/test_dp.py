"""Data-parallel replicas: the front's approximate radix trees and router (checked against a
simple reference), and `--dp-size 2` end to end through loom.Engine on the serving processes."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loom.runtime.entrypoints.engine import LocalEngine, ProcessEngine
from loom.runtime.front.dp_router import ApproxRadixTree, CacheAwareRouter, route_key
from loom.runtime.protocol import ServerError

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="abc", max_size=12), max_size=12), st.lists(st.text(alphabet="abc", max_size=12), max_size=6))
def test_tree_match_is_the_longest_common_prefix_with_anything_inserted(inserted, queries):
    tree = ApproxRadixTree()
    for text in inserted:
        tree.insert(text)
    for q in queries + inserted:
        want = max((len(os.path.commonprefix([q, t])) for t in inserted), default=0)
        assert tree.match(q) == want, (inserted, q)
    assert tree.size == sum(len(n.key) for n in tree._nodes())


def test_tree_forgets_least_recently_used_text_first():
    tree = ApproxRadixTree(max_chars=100)
    tree.insert("old-" + "x" * 40)
    tree.insert("new-" + "y" * 40)
    tree.insert("new-" + "z" * 40)  # past 100 chars: the oldest leaf goes
    assert tree.size <= 100
    assert tree.match("old-" + "x" * 40) < 10 and tree.match("new-" + "z" * 40) == 44


def test_router_follows_the_cache_then_the_load():
    router = CacheAwareRouter(2)
    system_a, system_b = "You are a pirate. " * 8, "You are a poet. " * 8
    first_a = router.route(system_a + "q1")
    first_b = router.route(system_b + "q1")
    assert first_a != first_b  # nothing cached: the emptier replica
    assert all(router.route(system_a + f"q{i}") == first_a for i in range(2, 10))
    assert all(router.route(system_b + f"q{i}") == first_b for i in range(2, 10))
    router.load[first_a] = 100  # badly skewed load beats the cache
    assert router.route(system_a + "q99") == first_b
    rr = CacheAwareRouter(3, "round_robin")
    assert [rr.route("same") for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    assert route_key(None, [72, 105]) == "Hi"
    with pytest.raises(ValueError, match="dp_routing"):
        CacheAwareRouter(2, "random")


@pytest.fixture(scope="module")
def model(make_tiny_model):
    return str(make_tiny_model("llama"))


def test_two_replicas_answer_like_one_engine_and_keep_prefixes_together(model):
    prefixes = ["Alpha alpha alpha alpha alpha alpha alpha. ", "Omega omega omega omega omega omega omega. "]
    prompts = [p + f"Question {i}?" for i in range(4) for p in prefixes]
    with LocalEngine(model_path=model, max_total_tokens=1024) as local:
        want = local.generate(prompts, GREEDY)
    with ProcessEngine(model_path=model, max_total_tokens=1024, dp_size=2) as engine:
        got = engine.generate(prompts, GREEDY)
        assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]
        streamed = list(engine.generate(prompts[0], GREEDY, stream=True))
        assert "".join(c["text"] for c in streamed) == want[0]["text"]
        for p in prompts:  # one by one now: each prefix should stay on the replica that has it
            engine.generate(p + " again", GREEDY)
        info = engine.get_server_info()
        assert len(info["replicas"]) == 2 and info["max_total_tokens"] == 2048
        hits = [r["stats"].get("cached_tokens", 0) for r in info["replicas"]]
        assert all(h > 0 for h in hits), info["replicas"]
        assert info["stats"]["cached_tokens"] == sum(hits)
        # A dead replica fails the whole server fast; it never answers half the traffic silently.
        victim = next(pid for name, pid in info["pids"].items() if name.startswith("scheduler.dp1"))
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ServerError):
            engine.generate(prompts, GREEDY)


def test_replicas_take_their_own_gpus(monkeypatch):
    import loom.runtime.front.dp_router as dpr
    from loom.runtime.model_executor.device import resolve_device
    from loom.runtime.server_args import ServerArgs

    class FakeReplica:  # records the arguments a replica would start with
        def __init__(self, args, log_level):
            self.args, self.tokenizer, self.metrics = args, None, None

    monkeypatch.setattr(dpr, "AsyncEngine", FakeReplica)
    dp = dpr.DataParallelEngine(ServerArgs(model_path="m", dp_size=3, tp_size=2, base_gpu_id=1))
    assert [r.args.base_gpu_id for r in dp.replicas] == [1, 3, 5]
    assert resolve_device("cuda", 3) == torch.device("cuda", 3) and resolve_device("cpu", 3) == torch.device("cpu")
    assert resolve_device("cuda:2", 5) == torch.device("cuda", 2)
