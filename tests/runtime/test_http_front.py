"""The HTTP front's checks without a server process: bounded JSON bodies, the API key's sources,
the OpenAI field checks and their error names, the context-room check, the request-end metrics
and shutdown's abort of what still runs, and the OpenAPI models against the parsers."""

from __future__ import annotations

import asyncio
import json

import pytest
from transformers import AutoTokenizer

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints import openai_params as op
from loom.runtime.entrypoints.api_schema import REQUEST_MODELS, ChatMessage, SamplingParamsBody
from loom.runtime.entrypoints.http_guard import _host_name
from loom.runtime.entrypoints.http_options import HttpOptions, resolve_api_key
from loom.runtime.entrypoints.json_body import loads_json, nesting_depth_over
from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError
from loom.runtime.front.metrics import FrontMetrics
from loom.runtime.front.tokenizer_manager import TokenizerManager
from loom.runtime.protocol import GENERATE_KEYS, IGNORED_GENERATE_KEYS, GenerateRequest, RequestError
from loom.runtime.sampling_params import _ALIASES, _IGNORED, _UNSUPPORTED, SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("http-units"), arch="qwen2", vocab_size=512, seed=5)
    return AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------- bounded JSON
@pytest.mark.parametrize("depth, ok", [(64, True), (65, False), (900, False), (100_000, False)])
def test_json_nested_past_the_limit_is_a_400_naming_the_body(depth, ok):
    raw = ('{"a":' * depth + "1" + "}" * depth).encode()
    if ok:
        assert loads_json(raw, 64)["a"]
        return
    with pytest.raises(RequestError) as err:  # never a RecursionError, however deep
        loads_json(raw, 64)
    assert err.value.status == 400 and err.value.param == "body" and "64" in str(err.value)


def test_depth_walk_does_not_recurse():
    deep: list = []
    for _ in range(50_000):
        deep = [deep]
    assert nesting_depth_over(deep, 64)
    assert not nesting_depth_over({"a": [1, {"b": [2]}]}, 4) and nesting_depth_over({"a": [1, {"b": [2]}]}, 3)


def test_json_numbers_without_a_fraction_are_ints():
    assert loads_json(b'{"n": 2.0, "max_tokens": 1e3, "temperature": 0.5, "top_p": 1}', 64) == {
        "n": 2, "max_tokens": 1000, "temperature": 0.5, "top_p": 1}  # fmt: skip
    assert isinstance(loads_json(b'{"n": 2.0}', 64)["n"], int)


def test_half_a_surrogate_pair_is_a_400_naming_its_field():
    """JSON can spell "\\ud800" alone, which is no Unicode text (the tokenizer raised TypeError: 500)."""
    with pytest.raises(RequestError) as err:
        loads_json(rb'{"messages": [{"role": "user", "content": "a\udc00b"}]}', 64)
    assert err.value.param == "messages[0].content" and "surrogate" in str(err.value)
    assert loads_json(rb'{"text": "\ud83d\ude00 and \\ud800"}', 64)["text"] == "\U0001f600 and \\ud800"  # a pair; an escaped backslash


def test_null_flags_mean_their_defaults():
    req = GenerateRequest.from_body({"text": "x", "stream": None, "reject_invalid": None, "return_text_in_logprobs": None})
    assert (req.stream, req.reject_invalid, req.return_text_in_logprobs) == (False, True, False)


@pytest.mark.parametrize("raw, message", [(b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"),
                                          (b"\xff\xfe", "not valid JSON")])  # fmt: skip
def test_invalid_bodies_name_the_body(raw, message):
    with pytest.raises(RequestError, match=message) as err:
        loads_json(raw, 64)
    assert err.value.param == "body"


# ---------------------------------------------------------------------- flags
def test_api_key_comes_from_the_flag_a_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LOOM_API_KEY", raising=False)
    assert resolve_api_key(None, None) is None
    monkeypatch.setenv("LOOM_API_KEY", "from-env")
    assert resolve_api_key(None, None) == "from-env"
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, str(key_file)) == "from-file"  # the file wins over the environment
    assert resolve_api_key("from-flag", None) == "from-flag"
    with pytest.raises(ValueError, match="not both"):
        resolve_api_key("x", str(key_file))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        resolve_api_key(None, str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="missing"):
        resolve_api_key(None, str(tmp_path / "missing"))


def test_host_names_accepted_by_default_and_when_opened():
    default = HttpOptions()
    assert default.hosts_for("127.0.0.1") == {"localhost", "127.0.0.1", "::1"} and default.hosts_for("0.0.0.0") is None
    listed = HttpOptions(allowed_hosts=("Loom.Internal",))
    assert listed.hosts_for("0.0.0.0") == {"loom.internal", "localhost", "127.0.0.1", "::1"}
    assert HttpOptions(allowed_hosts=("*",)).hosts_for("127.0.0.1") is None
    assert [_host_name(h) for h in ("[::1]:8000", "LOCALHOST:80", "127.0.0.1", "evil.example.:30000")] == [
        "::1", "localhost", "127.0.0.1", "evil.example"]  # fmt: skip
    with pytest.raises(ValueError, match="allowed-origins"):
        HttpOptions(allowed_origins=("app.example",))


# ---------------------------------------------------------------------- OpenAI fields
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "body, param",
    [
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "n": 129}, "n"),
        ({**CHAT, "n": True}, "n"),
        ({**CHAT, "stream_options": "yes", "stream": True}, "stream_options"),
        ({**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({**CHAT, "stream_options": {"include_usage": 1}, "stream": True}, "stream_options.include_usage"),
        ({**CHAT, "max_tokens": "ten"}, "max_tokens"),
        ({**CHAT, "tool_choice": "required"}, "tool_choice"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({**CHAT, "logit_bias": {"5": 1}}, "logit_bias"),
        ({"prompt": "x", "best_of": 2}, "best_of"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
    ],
)
def test_openai_fields_are_checked_and_named(body, param):
    allowed = op.CHAT_KEYS if "messages" in body else op.COMPLETION_KEYS
    with pytest.raises(RequestError) as err:
        op.sampling_from_openai(body, allowed)
    assert err.value.param == param and err.value.status == 400


@pytest.mark.parametrize(
    "check, body, param",
    [
        (op.chat_messages, {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        (op.chat_messages, {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": 5}]}, "messages[1].content"),
        (op.chat_messages, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0]"),
        (op.chat_messages, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
        (op.chat_messages, {"messages": ["hi"]}, "messages[0]"),
        (op.response_format_schema, {"response_format": {"type": "json_schema", "json_schema": "x"}}, "response_format.json_schema"),
        (op.response_format_schema, {"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
         "response_format.json_schema.schema"),
        (op.response_format_schema, {"response_format": {"type": "yaml"}}, "response_format.type"),
        (op.chat_logprobs, {"top_logprobs": 2}, "top_logprobs"),
        (op.chat_logprobs, {"logprobs": 1}, "logprobs"),
        (op.completion_logprobs, {"logprobs": 21}, "logprobs"),
        (op.completion_prompts, {"prompt": [1, "a"]}, "prompt"),
        (op.completion_prompts, {"prompt": []}, "prompt"),
    ],
)  # fmt: skip
def test_openai_bodies_are_checked_and_named(check, body, param):
    with pytest.raises(RequestError) as err:
        check(body)
    assert err.value.param == param


QWEN3_LIKE = ("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
              "{% if add_generation_prompt %}{% if enable_thinking is defined and not enable_thinking %}<think></think>"
              "{% endif %}assistant:{% endif %}")  # fmt: skip


def test_chat_template_kwargs_take_only_the_templates_own_variables():
    assert op.template_variables(QWEN3_LIKE) == {"messages", "add_generation_prompt", "enable_thinking"}
    assert op.template_kwargs({"chat_template_kwargs": {"enable_thinking": False}}, QWEN3_LIKE) == {"enable_thinking": False}
    for kwargs, param in [({"chat_template": "{{ 7 * 7 }}"}, "chat_template_kwargs.chat_template"),
                          ({"add_generation_prompt": False}, "chat_template_kwargs.add_generation_prompt"),
                          ({"foo": 1}, "chat_template_kwargs.foo"),
                          ({"enable_thinking": {"a": 1}}, "chat_template_kwargs.enable_thinking")]:  # fmt: skip
        with pytest.raises(RequestError) as err:
            op.template_kwargs({"chat_template_kwargs": kwargs}, QWEN3_LIKE)
        assert err.value.param == param


def test_loom_errors_are_renamed_into_openai_fields():
    exc = RequestError("sampling_params.temperature must be a number >= 0, got 'hot'", "sampling_params.temperature")
    renamed = op.openai_error(exc, "messages", {})
    assert renamed.param == "temperature" and str(renamed) == "temperature must be a number >= 0, got 'hot'"
    exc = RequestError("too long", "sampling_params.max_new_tokens")
    assert op.openai_error(exc, "prompt", {"max_completion_tokens": 9}).param == "max_completion_tokens"
    assert op.openai_error(exc, "prompt", {"max_tokens": 9}).param == "max_tokens"
    exc = RequestError("input_ids has 3000 tokens; the model's context length is 2048", "input_ids")
    renamed = op.openai_error(exc, "prompt", {})
    assert renamed.param == "prompt" and str(renamed) == "prompt has 3000 tokens; the model's context length is 2048"
    exc = RequestError("bad schema", "sampling_params.json_schema")
    assert op.openai_error(exc, "messages", {"response_format": {"type": "json_schema"}}).param == "response_format"


# ---------------------------------------------------------------------- the context's room
def test_max_tokens_past_the_context_is_refused_with_vllms_message(tokenizer):
    tm = TokenizerManager(tokenizer, context_len=64, vocab_size=512, max_total_tokens=4096)
    req = GenerateRequest(input_ids=[5] * 10, sampling_params={"max_new_tokens": 10**12}, text_name="prompt")
    with pytest.raises(RequestError) as err:
        tm.tokenize(req, req.items())
    assert err.value.param == "sampling_params.max_new_tokens"
    assert str(err.value) == ("This model's maximum context length is 64 tokens. However, you requested 1000000000010 tokens "
                              "(10 in the input_ids, 1000000000000 in the completion). Please reduce the length of the "
                              "input_ids or completion.")  # fmt: skip
    fits = GenerateRequest(input_ids=[5] * 10, sampling_params={"max_new_tokens": 54})
    assert tm.tokenize(fits, fits.items())[0][0].sampling_params["max_new_tokens"] == 54
    unset = GenerateRequest(input_ids=[5] * 10, sampling_params={"max_new_tokens": None})  # null: until the context is full
    assert tm.tokenize(unset, unset.items())[0][0].sampling_params["max_new_tokens"] == 54


# ---------------------------------------------------------------------- request ends in the metrics
def _engine(tokenizer) -> tuple[AsyncEngine, list]:
    engine = AsyncEngine.__new__(AsyncEngine)
    engine.dead_reason, engine._closed, engine._reqs, engine.closing, engine._ended = None, False, {}, None, None
    engine._replies = {}
    engine.metrics = FrontMetrics()
    engine.tokenizer_manager = TokenizerManager(tokenizer, context_len=2048, vocab_size=512, max_total_tokens=2048)
    sent: list = []
    engine._send = sent.append
    return engine, sent


def _ends(engine: AsyncEngine) -> dict[str, float]:
    return {s.labels["finish_reason"]: s.value for m in engine.metrics.requests.collect() for s in m.samples
            if s.name == "loom_requests_total"}  # fmt: skip


def test_shutdown_aborts_what_runs_with_503_and_counts_every_end(tokenizer, caplog):
    async def run() -> tuple[AsyncEngine, list, list]:
        engine, sent = _engine(tokenizer)
        runs = [engine.generate(GenerateRequest(input_ids=[1, 2], sampling_params={"max_new_tokens": 50})) for _ in range(2)]
        tasks = [asyncio.ensure_future(agen.__anext__()) for agen in runs]
        left = engine.generate(GenerateRequest(input_ids=[3], sampling_params={"max_new_tokens": 50}, stream=True))
        leaving = asyncio.ensure_future(left.__anext__())
        await asyncio.sleep(0)
        leaving.cancel()  # its client leaves before any output
        await asyncio.wait({leaving})
        await left.aclose()
        engine.stop_admitting()
        with pytest.raises(EngineDeadError, match="shutting down"):
            await engine.generate(GenerateRequest(input_ids=[1])).__anext__()  # no new request once stopping
        assert engine.num_running == 2  # still running: the server's grace period would wait for them
        assert engine.abort_all("the server is shutting down: grace period over") == 2
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return engine, sent, results

    engine, sent, results = asyncio.run(run())
    assert all(isinstance(r, EngineDeadError) and "grace period over" in str(r) for r in results)
    assert engine.num_running == 0
    assert [type(m).__name__ for m in sent].count("AbortReq") == 3  # the scheduler drops all three
    assert _ends(engine) == {"aborted": 2, "abandoned": 1}
    assert len([r for r in caplog.records if "aborted request" in r.getMessage()]) == 2  # one line per request


def test_a_refused_call_counts_once():
    metrics = FrontMetrics()
    metrics.count_refused(RequestError("bad", "text"))
    from loom.runtime.front.metrics import mark_counted

    metrics.count_refused(mark_counted(RequestError("already counted", "text")))
    assert [s.value for m in metrics.requests.collect() for s in m.samples if s.labels.get("finish_reason") == "refused"
            and s.name == "loom_requests_total"] == [1]  # fmt: skip


# ---------------------------------------------------------------------- the OpenAPI document is true
def _fields(model) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


def test_the_request_models_have_the_fields_the_parsers_accept():
    assert _fields(REQUEST_MODELS["GenerateBody"]) == set(GENERATE_KEYS) | IGNORED_GENERATE_KEYS
    sampling = {f for f in SamplingParams.__dataclass_fields__} | set(_ALIASES) | set(_UNSUPPORTED) | set(_IGNORED)
    assert _fields(SamplingParamsBody) == sampling
    assert _fields(REQUEST_MODELS["CompletionBody"]) == op.COMPLETION_KEYS
    assert _fields(REQUEST_MODELS["ChatBody"]) == op.CHAT_KEYS
    assert _fields(ChatMessage) == op.MESSAGE_KEYS
    assert json.loads(json.dumps(ChatMessage.model_json_schema()))["properties"]["role"]["enum"] == list(op.CHAT_ROLES)
