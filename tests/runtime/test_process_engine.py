"""`loom.Engine` on the serving processes (front, scheduler, detokenizer) against the in-process
engine on the same weights: same tokens, same API, clean start and stop."""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest

from loom.runtime.entrypoints.engine import LocalEngine, ProcessEngine
from loom.runtime.protocol import ServerError

GREEDY = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
MAX_TOTAL_TOKENS = 1024


@pytest.fixture(scope="module")
def engines(make_tiny_model):
    model = make_tiny_model("qwen3")
    with LocalEngine(model_path=str(model), max_total_tokens=MAX_TOTAL_TOKENS) as local:
        with ProcessEngine(model_path=str(model), max_total_tokens=MAX_TOTAL_TOKENS, debug_check_memory=True) as remote:
            yield local, remote


def test_same_tokens_and_logprobs_as_in_process(engines):
    local, remote = engines
    prompts = ["Hello there", "The quick brown fox", "Hello there, how"]
    kw = dict(return_logprob=True, top_logprobs_num=2, logprob_start_len=0)
    want, got = local.generate(prompts, GREEDY, **kw), remote.generate(prompts, GREEDY, **kw)
    assert [r["output_ids"] for r in got] == [r["output_ids"] for r in want]
    assert [r["text"] for r in got] == [r["text"] for r in want]
    for g, w in zip(got, want):
        assert [t for _, t, _ in g["meta_info"]["output_token_logprobs"]] == [t for _, t, _ in w["meta_info"]["output_token_logprobs"]]
        assert g["meta_info"]["output_token_logprobs"][0][0] == pytest.approx(w["meta_info"]["output_token_logprobs"][0][0], abs=1e-4)
    single = remote.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)
    assert single["output_ids"] == local.generate(input_ids=[5, 6, 7], sampling_params=GREEDY)["output_ids"]


def test_stream_gives_deltas(engines):
    local, remote = engines
    chunks = list(remote.generate("Once upon a time", GREEDY, stream=True))
    whole = local.generate("Once upon a time", GREEDY)
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert sum((c["output_ids"] for c in chunks), []) == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    # Leaving a stream early aborts it and releases its memory.
    it = remote.generate("abandon", {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
    next(it)
    it.close()
    deadline = time.monotonic() + 20
    while (mem := remote.get_server_info()["memory"])["held"]:
        assert time.monotonic() < deadline, mem
        time.sleep(0.05)


def test_errors_name_the_input_and_grammar_aborts_stay_per_request(engines):
    _, remote = engines
    with pytest.raises(ValueError, match="top_p"):
        remote.generate("x", {"top_p": 7})
    with pytest.raises(ValueError, match="single prompt"):
        remote.generate(["a", "b"], GREEDY, stream=True)
    out = remote.generate(["x", "y"], [{"regex": "(", "max_new_tokens": 4}, {"regex": "[ab]{3}", "max_new_tokens": 8}])
    assert out[0]["meta_info"]["finish_reason"]["type"] == "abort" and "regex" in out[0]["meta_info"]["finish_reason"]["message"]
    assert len(out[1]["text"]) == 3 and set(out[1]["text"]) <= {"a", "b"}


def test_flush_and_server_info(engines):
    _, remote = engines
    remote.generate("warm the cache with this prompt", GREEDY)
    info = remote.get_server_info()
    assert info["max_total_tokens"] == MAX_TOTAL_TOKENS and info["memory"]["evictable"] > 0
    assert remote.flush_cache() is True
    assert remote.get_server_info()["memory"]["evictable"] == 0


def test_shutdown_leaves_nothing_and_a_dead_server_fails_fast(make_tiny_model):
    model = make_tiny_model("llama")
    engine = ProcessEngine(model_path=str(model), max_total_tokens=256)
    info = engine.get_server_info()
    ipc_dir = pathlib.Path(info["ipc_dir"])
    pids = set(info["pids"].values())
    os.kill(info["pids"]["scheduler"], signal.SIGKILL)
    with pytest.raises(ServerError):
        engine.generate("anyone there?", GREEDY)
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.generate("x")
    deadline = time.monotonic() + 15
    while any(pathlib.Path(f"/proc/{p}").exists() and "Z" not in pathlib.Path(f"/proc/{p}/stat").read_text().split(")")[-1][:3]
              for p in pids):  # fmt: skip
        assert time.monotonic() < deadline, "engine processes outlived shutdown()"
        time.sleep(0.2)
    assert not ipc_dir.exists()
