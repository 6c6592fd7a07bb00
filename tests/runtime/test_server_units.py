"""The serving layer's pieces without processes: the wire codec, the detokenizer, the front's
request table (streamed deltas add up to the final text however messages bunch up)."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from transformers import AutoTokenizer

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.detokenizer.detokenizer import Detokenizer
from loom.runtime.front.async_engine import AsyncEngine
from loom.runtime.front.metrics import FrontMetrics
from loom.runtime.front.tokenizer_manager import ReqState, TokenizerManager
from loom.runtime.ipc import MESSAGE_TYPES, IpcPaths, decode, encode
from loom.runtime.messages import (
    AbortReq,
    BatchStrOut,
    BatchTokenIDOut,
    DecodeOptions,
    FlushCacheOut,
    FlushCacheReq,
    SchedulerInfoOut,
    SchedulerInfoReq,
    SchedulerReady,
    StrOut,
    TokenIDOut,
    TokenizedGenerateReq,
)
from loom.runtime.protocol import GenerateRequest, RequestError
from loom.runtime.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("units"), arch="qwen2", vocab_size=512, seed=5)
    return AutoTokenizer.from_pretrained(path)


def test_codec_round_trips_every_message_shape():
    decode_options = DecodeOptions(skip_special_tokens=False, spaces_between_special_tokens=False, stop=["\n\n", "é"], no_stop_trim=True)
    out = TokenIDOut("r1", [4, 5], {"type": "stop", "matched": 4}, 3, 2, 1, [(None, 1), (-0.5, 2)], [(-0.25, 4), (-1.5, 5)],
                     [None, [(-0.5, 2), (-2.0, 7)]], [[(-0.25, 4)], [(-1.5, 5), (-3.0, 6)]], decode_options)  # fmt: skip
    examples = [  # every field away from its default, so a field the codec drops shows
        TokenizedGenerateReq("r1", [1, 2, 3], {"temperature": 0.5, "stop": ["\n"], "json_schema": '{"a": 1}'}, True, 0, 2, True,
                             decode_options),  # fmt: skip
        AbortReq("r1", "bye"),
        FlushCacheReq(),
        FlushCacheOut(False, "requests are running"),
        out,
        BatchTokenIDOut([out, TokenIDOut("r2", [], None, 7, 0, 0)]),
        SchedulerReady(context_len=8192, vocab_size=512, max_total_tokens=4096),
        StrOut(out, "x", "final x"),
        BatchStrOut([StrOut(out, "x", None), StrOut(out, "", "y")]),
        SchedulerInfoReq(),
        SchedulerInfoOut(memory={"free": 10, "evictable": 2}, stats={"prompt_tokens": 9}, running=1, waiting=3),
    ]
    assert {type(m).__name__ for m in examples} == set(MESSAGE_TYPES), "give every message type an example here"
    for msg in examples:
        back = decode(encode(msg))
        assert type(back) is type(msg) and back == msg, msg  # (logprob, id) pairs come back as tuples too


def test_codec_refuses_unknown_and_malformed_messages():
    with pytest.raises(ValueError, match="malformed"):
        decode(msgspec.msgpack.encode(("os.system", {"command": "true"})))
    with pytest.raises(ValueError, match="malformed"):
        decode(msgspec.msgpack.encode(("AbortReq", {"rid": 5})))
    with pytest.raises(ValueError, match="malformed"):
        decode(b"\xff\x00garbage")


def test_ipc_dir_is_private_and_removed():
    paths = IpcPaths.create()
    import os
    import stat

    assert stat.S_IMODE(os.stat(paths.root).st_mode) == 0o700
    assert paths.to_front.startswith("ipc://" + paths.root)
    paths.remove()
    assert not os.path.exists(paths.root)


def test_detokenizer_deltas_add_up_and_stop_is_trimmed(tokenizer):
    ids = tokenizer.encode("Hello world, this is a test", add_special_tokens=False)  # the scheduler stops at " test"
    detok = Detokenizer(tokenizer)
    deltas, final = [], None
    for i, tok in enumerate(ids):
        reason = {"type": "stop", "matched": " test"} if i == len(ids) - 1 else None
        options = DecodeOptions(stop=[" test"]) if i == 0 else None  # they come with the first output
        (out,) = detok.handle(BatchTokenIDOut([TokenIDOut("r", [tok], reason, 3, i + 1, 0, decode=options)])).outputs
        deltas.append(out.text_delta)
        final = out.final_text
    assert final == "Hello world, this is a" == "".join(deltas)
    assert "r" not in detok.states  # forgotten once finished


def test_stream_deltas_survive_bunched_messages(tokenizer):
    """All of a request's messages arrive before its consumer runs: nothing may be lost."""

    async def run() -> tuple[list[dict], str]:
        engine = AsyncEngine.__new__(AsyncEngine)
        engine.dead_reason, engine._closed, engine._reqs, engine.closing, engine._ended = None, False, {}, None, None
        engine.metrics = FrontMetrics()
        engine.tokenizer_manager = TokenizerManager(tokenizer, context_len=2048, vocab_size=512, max_total_tokens=2048)
        sent: list = []
        engine._send = sent.append
        ids = [215, 114, 225, 271, 114, 229]  # byte tokens: U+FFFD appears mid-stream
        detok = Detokenizer(tokenizer)
        agen = engine.generate(GenerateRequest(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 6}, stream=True))
        first = asyncio.ensure_future(agen.__anext__())
        await asyncio.sleep(0)  # the request is sent
        (req,) = sent
        for i, tok in enumerate(ids):
            reason = {"type": "length", "length": 6} if i == len(ids) - 1 else None
            decode_options = req.decode if i == 0 else None
            engine._dispatch(detok.handle(BatchTokenIDOut([TokenIDOut(req.rid, [tok], reason, 3, i + 1, 0, decode=decode_options)])))
        chunks = [await first] + [c async for c in agen]
        return chunks, tokenizer.decode(ids)

    chunks, whole = asyncio.run(run())
    assert "".join(c["text"] for c in chunks) == whole
    assert sum((c["output_ids"] for c in chunks), []) == [215, 114, 225, 271, 114, 229]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 6}


def test_state_takes_the_final_text(tokenizer):
    tm = TokenizerManager(tokenizer, context_len=2048, vocab_size=512, max_total_tokens=2048)
    state = ReqState("r", prompt_tokens=3, return_logprob=False, return_text_in_logprobs=False)
    assert tm.process_output(state, StrOut(TokenIDOut("r", [5], None, 3, 1, 0), "ab", None)) == "ab"
    assert tm.process_output(state, StrOut(TokenIDOut("r", [6], {"type": "length"}, 3, 2, 0), "c", "abc")) == "c"
    assert state.output_text == "abc" and state.finished and state.output_ids == [5, 6]


@pytest.mark.parametrize(
    "call, param",
    [
        (lambda tm: SamplingParams.from_dict({"top_p": 5}), "sampling_params.top_p"),
        (lambda tm: SamplingParams.from_dict({"temprature": 1}), "sampling_params.temprature"),
        (lambda tm: GenerateRequest(text="x", input_ids=[1]).items(), "text"),
        (lambda tm: GenerateRequest(text=["a", "b"], sampling_params=[{}]).items(), "sampling_params"),
        (lambda tm: GenerateRequest(text="x", sampling_params={"n": 0}).items(), "sampling_params.n"),
        (lambda tm: tm.tokenize(r := GenerateRequest(input_ids=[[1], [2] * 5000]), r.items()), "input_ids"),
        (lambda tm: tm.tokenize(r := GenerateRequest(text="x", top_logprobs_num=-1), r.items()), "top_logprobs_num"),
        (lambda tm: GenerateRequest(text=["a"] * 33, sampling_params={"n": 128}).items(), "text"),
        (lambda tm: tm.tokenize(r := GenerateRequest(text=["ok", "x" * 10**7]), r.items()), "text"),
        (lambda tm: tm.tokenize(r := GenerateRequest(text="x", sampling_params={"max_new_tokens": 2100}), r.items()),
         "sampling_params.max_new_tokens"),
    ],
)
def test_errors_carry_their_field(tokenizer, call, param):
    """A request mistake raises RequestError (a ValueError) whose `param` names the field, whichever
    layer finds it; the HTTP and ZeroMQ answers take the field from there, not from the text. (The
    KV cache here holds fewer tokens than the context: 2,100 new tokens fit the one, not the other.)"""
    tm = TokenizerManager(tokenizer, context_len=4096, vocab_size=512, max_total_tokens=2048)
    with pytest.raises(RequestError) as err:
        call(tm)
    assert err.value.param == param and isinstance(err.value, ValueError)
