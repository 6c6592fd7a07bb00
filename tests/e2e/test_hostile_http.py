"""`loom serve` against hostile and malformed input, end to end: what a client sends never holds
up the others, every mistake is a 4xx naming the field, Host/Origin/Content-Type/API-key checks,
HEAD and POST-only routes, request-end metrics, and a SIGTERM that drains and answers 503."""

from __future__ import annotations

import json
import pathlib
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
import zmq

from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
JSON = {"Content-Type": "application/json"}
KEY = "file-key-456"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("hostile"), arch="qwen2", vocab_size=512, seed=5)


@pytest.fixture(scope="module")
def servers(model_dir, tmp_path_factory) -> Iterator[dict]:
    """Started together so their model loads overlap: the main one (defaults, plus a front door),
    and one with an API key file, CORS and a short shutdown grace (the last test stops it)."""
    tmp = tmp_path_factory.mktemp("hostile-run")
    (tmp / "key").write_text(KEY + "\n")
    door = f"ipc://{tmp}/door"
    started = {
        "main": Server(model_dir, "--zmq-address", door),
        "keyed": Server(model_dir, "--api-key-file", str(tmp / "key"), "--allowed-origins", "https://app.example",
                        "--allowed-hosts", "loom.internal", "--shutdown-grace-s", "1", max_total_tokens=8192),
    }  # fmt: skip
    started["main"].door = door
    started["keyed"].headers = {"Authorization": f"Bearer {KEY}"}
    yield started
    for srv in started.values():
        srv.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["main"].wait_ready()


def small_request(server: Server) -> httpx.Response:
    return httpx.post(server.url + "/generate", json={"text": "small", "sampling_params": GREEDY}, timeout=60)


# ---------------------------------------------------------------------- nothing holds up the others
def test_a_30mb_body_is_refused_while_others_are_answered(server):
    answers: dict = {}

    def huge(name: str, content) -> None:
        answers[name] = httpx.post(server.url + "/generate", content=content, headers=JSON, timeout=60)

    body = b'{"text": "' + b"a" * (30 * 2**20) + b'"}'
    chunked = (body[i : i + 2**20] for i in range(0, len(body), 2**20))  # no Content-Length: counted while read
    threads = [threading.Thread(target=huge, args=("sized", body)), threading.Thread(target=huge, args=("chunked", chunked))]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    assert small_request(server).status_code == 200
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
    assert time.monotonic() - t0 < 10
    for t in threads:
        t.join(60)
    for name in ("sized", "chunked"):
        r = answers[name]
        assert r.status_code == 413, (name, r.text)
        err = r.json()["error"]
        assert err["param"] == "body" and str(16 * 2**20) in err["message"] and "--max-request-bytes" in err["message"]


@pytest.mark.slow
def test_a_prompt_longer_than_the_context_can_hold_is_refused_untokenized(server):
    """3 MB of text (within the size limit) took seconds to tokenize on this model's tiny vocabulary,
    on a worker thread, only to be refused; no token spells more characters than the vocabulary's
    longest entry, so it is refused before tokenizing, naming the text and the context. Small
    requests beside it are answered as ever."""
    done: dict = {}

    def large() -> None:
        r = httpx.post(server.url + "/generate", json={"text": "hello world " * 250_000, "sampling_params": GREEDY}, timeout=120)
        done["large"] = r

    t = threading.Thread(target=large)
    t.start()
    for _ in range(3):
        assert small_request(server).status_code == 200
    t.join(120)
    r = done["large"]
    assert r.status_code == 400 and r.json()["error"]["param"] == "text"
    assert "3000000 characters" in r.json()["error"]["message"] and "context length" in r.json()["error"]["message"]


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_bodies_are_400(server, route, depth):
    raw = '{"x": ' + "[" * depth + "]" * depth + "}"
    r = httpx.post(server.url + route, content=raw, headers=JSON, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "body" and "nests more than 64 levels" in r.json()["error"]["message"]


def test_front_door_refuses_deep_and_oversized_frames(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.door)

    def ask(frame: bytes) -> dict:
        sock.send(frame)
        assert sock.poll(30_000), "no reply"
        return msgspec.msgpack.decode(sock.recv())

    def s(x: str) -> bytes:
        return bytes([0xA0 | len(x)]) + x.encode()

    try:
        deep = b"\x83" + s("id") + s("d1") + s("method") + s("generate") + s("body") + (b"\x81" + s("x")) * 50_000 + b"\xc0"
        reply = ask(deep)
        assert reply["type"] == "error" and reply["body"]["status"] == 400 and "nests too deeply" in reply["body"]["error"]["message"]
        nested: dict = {}
        for _ in range(100):
            nested = {"x": nested}
        body = {"text": "x", "sampling_params": {"json_schema": nested}}
        reply = ask(msgspec.msgpack.encode({"id": "d2", "method": "generate", "body": body}))
        assert reply["body"]["status"] == 400 and reply["body"]["error"]["param"] == "body"
        reply = ask(msgspec.msgpack.encode({"id": "big", "method": "generate", "body": {"text": "a" * (17 * 2**20)}}))
        assert reply["body"]["status"] == 413 and "--max-request-bytes" in reply["body"]["error"]["message"]
        assert ask(msgspec.msgpack.encode({"id": "h", "method": "health", "body": {}}))["type"] == "done"  # still serving
    finally:
        sock.close()


# ---------------------------------------------------------------------- every mistake a 4xx naming its field
def test_json_routes_need_json(server):
    for headers in ({"Content-Type": "text/plain"}, {}):
        r = httpx.post(server.url + "/generate", content=b'{"text": "x"}', headers=headers, timeout=30)
        assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"
    r = httpx.post(server.url + "/generate", content=json.dumps({"text": "x", "sampling_params": GREEDY}),
                   headers={"Content-Type": "Application/JSON; charset=utf-8"}, timeout=30)  # fmt: skip
    assert r.status_code == 200


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    "route, body, param",
    [
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format.json_schema"),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": "x"}, "stream_options"),
        ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "suffix": "!"}, "suffix"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs"),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, "temperature"),
        ("/v1/chat/completions", {**CHAT, "min_tokens": -1}, "min_tokens"),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"chat_template": "{{ 7 * 7 }}"}}, "chat_template_kwargs.chat_template"),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"enable_thinking": True}}, "chat_template_kwargs.enable_thinking"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
        ("/v1/completions", {"prompt": "x" * 3000}, "prompt"),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 10**12}}, "sampling_params.max_new_tokens"),
    ],
)  # fmt: skip
def test_malformed_input_is_4xx_naming_the_field(server, route, body, param):
    r = httpx.post(server.url + route, json=body, timeout=30)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert "sampling_params" not in err["message"] or route == "/generate"


def test_max_tokens_past_the_context_gets_vllms_message(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 302_143}, timeout=30)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "max_tokens"
    assert err["message"].startswith("This model's maximum context length is 2048 tokens. However, you requested ")
    assert "in the messages, 302143 in the completion). Please reduce the length of the messages or completion." in err["message"]


# ---------------------------------------------------------------------- HTTP details and who may call
def test_head_wherever_get_and_state_changes_only_on_post(server):
    for path in ("/health", "/v1/models", "/get_model_info", "/metrics"):
        r = httpx.head(server.url + path, timeout=30)
        assert r.status_code == 200 and r.content == b"", path
    r = httpx.get(server.url + "/flush_cache", timeout=30)
    assert r.status_code == 405 and r.headers["allow"] == "POST" and r.json()["error"]["code"] == 405
    assert httpx.get(server.url + "/abort_request", timeout=30).status_code == 405
    assert httpx.post(server.url + "/flush_cache", timeout=30).status_code == 200


def test_only_loopback_hosts_and_same_origin_by_default(server):
    port = server.port
    for host in ("evil.example", f"evil.example:{port}", "10.0.0.1"):
        r = httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["param"] == "host", host
    for host in (f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
        assert httpx.get(server.url + "/v1/models", headers={"Host": host}, timeout=30).status_code == 200, host
    r = httpx.post(server.url + "/generate", json={"text": "x"}, headers={"Origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["param"] == "origin"
    assert "access-control-allow-origin" not in r.headers
    r = httpx.options(server.url + "/generate", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403
    same = httpx.post(server.url + "/generate", json={"text": "x", "sampling_params": GREEDY},
                      headers={"Origin": f"http://127.0.0.1:{port}"}, timeout=30)  # fmt: skip
    assert same.status_code == 200


def test_api_key_from_a_file_bearer_in_any_case_and_cors(servers):
    srv = servers["keyed"].wait_ready()
    assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"{scheme} {KEY}"}, timeout=30).status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Basic " + KEY}, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    preflight = httpx.options(srv.url + "/v1/chat/completions", timeout=30, headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})  # fmt: skip
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2},
                   headers={**auth, "Origin": "https://app.example"}, timeout=30)  # fmt: skip
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x"}, headers={**auth, "Origin": "https://evil.example"}, timeout=30)
    assert r.status_code == 403
    assert httpx.get(srv.url + "/v1/models", headers={**auth, "Host": "loom.internal:8000"}, timeout=30).status_code == 200
    assert httpx.get(srv.url + "/v1/models", headers={**auth, "Host": "other.internal"}, timeout=30).status_code == 403


# ---------------------------------------------------------------------- metrics count every end
def request_ends(server: Server) -> dict[str, float]:
    ends = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loom_requests_total{"):
            name, value = line.rsplit(" ", 1)
            ends[name.split('"')[1]] = float(value)
    return ends


def test_metrics_count_finished_abandoned_and_refused_requests(server):
    before = request_ends(server)
    assert small_request(server).status_code == 200
    body = {"text": "leave me", "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}, "stream": True}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # the client leaves mid-way
    assert httpx.post(server.url + "/generate", json={"text": "x", "bogus": 1}, timeout=30).status_code == 400
    assert httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 0}, timeout=30).status_code == 400
    assert httpx.post(server.url + "/generate", content=b"x" * 100, headers={"Origin": "https://evil.example"}).status_code == 403
    deadline = time.monotonic() + 10
    while True:
        after = request_ends(server)
        delta = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
        if delta.get("abandoned"):
            break
        assert time.monotonic() < deadline, delta
        time.sleep(0.1)
    assert delta == {"length": 1, "abandoned": 1, "refused": 3}


# ---------------------------------------------------------------------- shutdown
def test_sigterm_drains_then_answers_503_json_with_a_clean_log(servers):
    srv = servers["keyed"].wait_ready()
    answers: dict = {}
    started = threading.Event()

    def long(i: int) -> None:
        body = {"text": f"long {i}", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
        answers[i] = srv.client.post("/generate", json=body)

    def stream() -> None:
        events = []
        with srv.client.stream("POST", "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "stream": True, "ignore_eos": True}) as r:  # fmt: skip
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    started.set()
        answers["stream"] = (r.status_code, events)

    def short() -> None:
        answers["short"] = srv.client.post("/generate", json={"text": "short", "sampling_params": GREEDY})

    threads = [threading.Thread(target=long, args=(i,)) for i in range(2)] + [threading.Thread(target=stream)]
    for t in threads:
        t.start()
    assert started.wait(30)
    deadline = time.monotonic() + 30
    while srv.info()["num_running_reqs"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    threads.append(threading.Thread(target=short))
    threads[-1].start()
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    late = srv.client.post("/generate", json={"text": "late"})
    assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down"
    for t in threads:
        t.join(60)
    assert answers["short"].status_code == 200  # finished within the grace period
    for i in range(2):
        assert answers[i].status_code == 503 and "grace period" in answers[i].json()["error"]["message"]
    status, events = answers["stream"]
    assert status == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 503 and "grace period" in json.loads(events[-2])["error"]["message"]
    assert srv.proc.wait(30) == 0
    log = srv.proc.stdout.read()
    after_ready = log.split("loom serve: ready", 1)[1].splitlines()[1:]
    aborted = [line for line in after_ready if "aborted request" in line]
    assert len(aborted) == 3 and "Traceback" not in log, log
    assert [line for line in after_ready if line.strip() and line not in aborted] == [], log
