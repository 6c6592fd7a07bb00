"""`loom serve` end to end: a real server process, real clients (httpx, the `openai` package).

One server (with an API key) serves most tests; the fault and shutdown tests start their own.
"""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine

from server_proc import API_KEY, MAX_TOTAL_TOKENS, Server, alive, child_pids, kill_during_request

GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serve"), arch="qwen2", vocab_size=512, seed=5)


@pytest.fixture(scope="module")
def servers(model_dir) -> Iterator[dict[str, Server]]:
    """The shared server (with an API key) and two spares for the fault tests, started together
    so that their model loads overlap."""
    started = {"main": Server(model_dir, "--api-key", API_KEY), "sigterm": Server(model_dir), "kill": Server(model_dir)}
    yield started
    for srv in started.values():
        srv.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"].wait_ready()


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_name(oai) -> str:
    return oai.models.list().data[0].id


# ---------------------------------------------------------------------- native API
def test_generate_matches_offline_engine(server, model_dir):
    prompts = ["Hello there", "The story of a small"]
    outs = server.client.post("/generate", json={"text": prompts, "sampling_params": GREEDY}).json()
    with LocalEngine(model_path=str(model_dir), max_total_tokens=MAX_TOTAL_TOKENS) as engine:
        expected = engine.generate(prompts, GREEDY)
    assert [o["output_ids"] for o in outs] == [e["output_ids"] for e in expected]
    assert [o["text"] for o in outs] == [e["text"] for e in expected]
    assert outs[0]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}


def test_generate_input_ids_and_meta(server):
    out = server.client.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY}).json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert meta["prompt_tokens"] == 3 and meta["completion_tokens"] == 8 == len(out["output_ids"])


def test_generate_stream_is_cumulative_and_ends_with_done(server):
    whole = server.client.post("/generate", json={"text": "Once upon", "sampling_params": GREEDY}).json()
    events = []
    with server.client.stream("POST", "/generate", json={"text": "Once upon", "sampling_params": GREEDY, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: ") :])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["text"] == whole["text"] and chunks[-1]["output_ids"] == whole["output_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "length"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])


def test_generate_logprobs(server):
    body = {"text": "Hello", "sampling_params": GREEDY, "return_logprob": True, "logprob_start_len": 0,
            "top_logprobs_num": 3, "return_text_in_logprobs": True}  # fmt: skip
    meta = server.client.post("/generate", json=body).json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 8
    lp, tok, text = meta["output_token_logprobs"][0]
    assert lp <= 0 and isinstance(tok, int) and isinstance(text, str)
    # Greedy: the chosen token is the most likely one.
    assert meta["output_top_logprobs"][0][0][1] == tok and len(meta["output_top_logprobs"][0]) == 3
    assert meta["input_token_logprobs"][0][0] is None


def test_info_routes_and_flush(server, model_dir):
    info = server.client.get("/get_model_info").json()
    assert info["model_path"] == str(model_dir)
    assert "{%" in info["chat_template"] and info["eos_token"]
    info = server.info()
    assert info["max_total_tokens"] == MAX_TOTAL_TOKENS and info["memory"]["capacity"] == MAX_TOTAL_TOKENS
    assert server.client.get("/health_generate").status_code == 200
    assert server.client.post("/flush_cache").status_code == 200
    assert server.info()["memory"]["evictable"] == 0


def test_64_concurrent_clients(server):
    n = 64
    results: list = [None] * n

    def worker(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers, timeout=120) as c:
            r = c.post("/generate", json={"text": f"client {i} says", "sampling_params": {**GREEDY, "max_new_tokens": 6}})
            results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r[0] == 200 and r[1]["meta_info"]["completion_tokens"] == 6 for r in results)


def test_client_disconnect_aborts_and_frees_kv(server):
    generated_before = server.info()["stats"]["generated_tokens"]
    body = {"text": "a long story", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}, "stream": True}
    with server.client.stream("POST", "/generate", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first chunk
    deadline = time.monotonic() + 10
    while True:
        info = server.info()
        mem = info["memory"]
        if info["num_running_reqs"] == 0 and mem["held"] == 0:
            break
        assert time.monotonic() < deadline, f"request not aborted: {info}"
        time.sleep(0.1)
    assert info["stats"]["generated_tokens"] - generated_before < 1500  # stopped early
    assert mem["free"] + mem["evictable"] + mem["protected"] == mem["capacity"] and mem["protected"] == 0


def test_metrics(server):
    server.client.post("/generate", json={"text": "metrics please", "sampling_params": GREEDY})
    text = server.client.get("/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values["loom_prompt_tokens_total"] > 0 and values["loom_generation_tokens_total"] >= 8
    assert values["loom_time_to_first_token_seconds_count"] >= 1 and values["loom_inter_token_latency_seconds_count"] >= 7
    assert 0 <= values["loom_cache_hit_rate"] <= 1 and values["loom_num_running_reqs"] == 0
    assert values['loom_requests_total{finish_reason="length"}'] >= 1


def wait_idle(server: Server, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = server.info()
        if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0 and info["memory"]["held"] == 0:
            return info
        assert time.monotonic() < deadline, f"requests still running: {info}"
        time.sleep(0.1)


def test_non_streamed_client_timeout_aborts(server):
    before = server.info()["stats"]["generated_tokens"]
    body = {"text": "another long story", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
    with pytest.raises(httpx.ReadTimeout):
        server.client.post("/generate", json=body, timeout=0.3)
    info = wait_idle(server)
    assert info["stats"]["generated_tokens"] - before < 1500


def test_abort_request_by_rid(server):
    answer: dict = {}
    body = {"text": "abort me", "rid": "abort-me-1", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
    t = threading.Thread(target=lambda: answer.update(r=server.client.post("/generate", json=body)))
    t.start()
    deadline = time.monotonic() + 10
    while not server.client.post("/abort_request", json={"rid": "abort-me-1"}).json()["success"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    t.join(10)
    meta = answer["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] < 1500
    wait_idle(server)


# ---------------------------------------------------------------------- errors and auth
@pytest.mark.parametrize(
    "body, field",
    [
        (b"{not json", "body"),
        ({"text": 5}, None),
        ({"text": "x", "sampling_params": {"temperature": "hot"}}, "sampling_params.temperature"),
        ({"text": "x", "sampling_params": {"max_new_tokens": -1}}, "sampling_params.max_new_tokens"),
        ({"text": "x", "bogus": 1}, "bogus"),
        ({"input_ids": list(range(5)) * 500}, None),
    ],
)
def test_bad_input_is_4xx_naming_the_field(server, body, field):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = server.client.post("/generate", **kw)
    assert 400 <= r.status_code < 500
    err = r.json()["error"]
    if field:
        assert err["param"] == field and field.split(".")[-1] in err["message"]
    assert server.client.post("/generate", json={"text": "still", "sampling_params": GREEDY}).status_code == 200


def test_api_key_enforced(server):
    assert httpx.get(server.url + "/health").status_code == 200
    for path in ("/get_model_info", "/v1/models"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.post(server.url + "/generate", json={"text": "x"}).status_code == 401


# ---------------------------------------------------------------------- OpenAI API
def test_openai_chat_and_usage(oai, model_name, server):
    msgs = [{"role": "user", "content": "Say hi to test_openai_chat_and_usage"}]  # sent by no other test
    r = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    first = r.usage.prompt_tokens_details.cached_tokens
    assert first < r.usage.prompt_tokens - 5  # at most the chat template's opening was cached before
    again = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
    assert again.choices[0].message.content == r.choices[0].message.content
    # the whole prompt came from the radix cache, but for its last token, which is run for the logits
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1


def test_openai_chat_stream_n_logprobs(oai, model_name):
    msgs = [{"role": "user", "content": "Count"}]
    whole = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})  # fmt: skip
    text = ""
    for chunk in oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=6, temperature=0, stream=True,
                                             extra_body={"ignore_eos": True}):  # fmt: skip
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
    # Its deltas add up to the whole text, even where byte tokens decode to U+FFFD mid-stream.
    assert text == whole.choices[0].message.content
    r = oai.chat.completions.create(model=model_name, messages=msgs, max_tokens=4, n=3, temperature=1.0, seed=3,
                                    logprobs=True, top_logprobs=2, extra_body={"top_k": 20, "min_p": 0.01})  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.content) == len(r.choices[0].logprobs.content) or c.finish_reason == "stop"
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in c.logprobs.content)


def test_openai_completions_stop_and_stream(oai, model_name):
    base = oai.completions.create(model=model_name, prompt="The story", max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    text = base.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = oai.completions.create(model=model_name, prompt="The story", max_tokens=16, temperature=0, stop=[stop],
                                 extra_body={"ignore_eos": True})  # fmt: skip
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in oai.completions.create(model=model_name, prompt="The story", max_tokens=16, temperature=0, stream=True,
                                        extra_body={"ignore_eos": True})  # fmt: skip
        if c.choices
    )
    assert streamed == text, (streamed, text)


def test_constrained_decoding_through_both_apis(server, oai, model_name):
    out = server.client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 20, "regex": "[0-9]{3}"}}).json()
    assert len(out["text"]) == 3 and out["text"].isdigit()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    r = oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "json"}], max_tokens=60,
        temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content)["a"], int)


def test_generate_with_n_samples_each_prompt_n_times(server):
    body = {"text": ["Once", "Twice"], "sampling_params": {"n": 3, "temperature": 1.0, "max_new_tokens": 6, "ignore_eos": True}}
    out = server.client.post("/generate", json=body).json()
    assert len(out) == 6 and all(r["meta_info"]["completion_tokens"] == 6 for r in out)
    assert len({tuple(r["output_ids"]) for r in out[:3]}) > 1  # independent samples, not one result copied
    single = server.client.post("/generate", json={"text": "Once", "sampling_params": {"n": 2, "max_new_tokens": 2}}).json()
    assert isinstance(single, list) and len(single) == 2
    bad = server.client.post("/generate", json={"text": "x", "sampling_params": {"n": 0}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "sampling_params.n"


def test_invalid_grammar_answers_400_naming_the_field(server, oai, model_name):
    bad = {"text": "x", "sampling_params": {"max_new_tokens": 8, "regex": "([0-9]"}}
    r = server.client.post("/generate", json=bad)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "sampling_params.regex" and "regex" in err["message"]
    r = server.client.post("/generate", json={**bad, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sampling_params.regex"
    schema = {"type": "object", "properties": {"a": {"type": "integer", "multipleOf": 3}}}
    r = server.client.post("/generate", json={"text": ["x", "y"], "sampling_params": {"max_new_tokens": 4, "json_schema": json.dumps(schema)}})
    assert r.status_code == 400 and "multipleOf" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="multipleOf"):
        oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})  # fmt: skip
    # The server keeps serving, and a valid grammar in the same breath works.
    ok = server.client.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 8, "regex": "[a-c]{2}"}})
    assert ok.status_code == 200 and len(ok.json()["text"]) == 2


def test_openai_errors(oai, model_name):
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context length"):
        oai.completions.create(model=model_name, prompt=list(range(5)) * 500, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], temperature="hot")
    assert oai.completions.create(model=model_name, prompt="ok", max_tokens=2).choices[0].text is not None


# ---------------------------------------------------------------------- faults and shutdown
def test_sigterm_leaves_no_processes(servers):
    srv = servers["sigterm"].wait_ready()
    info = srv.info()
    pids = child_pids(srv.proc.pid)
    assert set(info["pids"].values()) - {srv.proc.pid} <= pids and len(pids) >= 2
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0
    assert not pathlib.Path(info["ipc_dir"]).exists(), "the socket folder was not removed"
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"orphans left: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)
    srv.client.close()


def test_killing_the_scheduler_gives_503_and_nonzero_exit(servers):
    srv = servers["kill"].wait_ready()
    r, took = kill_during_request(srv, "scheduler")
    assert r.status_code == 503 and "scheduler" in r.json()["error"]["message"]
    assert took < 5
    try:
        late = httpx.post(srv.url + "/generate", json={"text": "x"}, timeout=5)
        assert late.status_code == 503
    except httpx.TransportError:
        pass  # already gone: fine
    assert srv.proc.wait(20) != 0
    srv.client.close()
