"""`loom.OpenAI`: programs through the official `openai` package against `loom serve`'s /v1."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

import loom as sgl
from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server, serving

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    with serving(build_tiny_checkpoint(tmp_path_factory.mktemp("lang-openai"), arch="llama", vocab_size=512, seed=3)) as srv:
        yield srv


@pytest.fixture(scope="module")
def backend(server) -> sgl.OpenAI:
    model = server.client.get("/v1/models").json()["data"][0]["id"]
    return sgl.OpenAI(model, base_url=server.url + "/v1", api_key="none")


def test_chat_gen_matches_the_chat_endpoint(backend, server) -> None:
    @sgl.function
    def chat(s, q):
        s += sgl.system("Be brief.")
        s += sgl.user(q)
        s += sgl.assistant(sgl.gen("a", max_tokens=5))

    state = chat.run(q="Say hello.", backend=backend, **GREEDY)
    assert state.error() is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    direct = server.client.post("/v1/chat/completions", json={
        "model": backend.model, "messages": messages, "max_tokens": 5, "temperature": 0,
    }).json()  # fmt: skip
    assert state["a"] == direct["choices"][0]["message"]["content"]
    assert state.messages() == [*messages, {"role": "assistant", "content": state["a"]}]
    assert state.get_meta_info("a")["completion_tokens"] <= 5


def test_plain_text_uses_completions(backend, server) -> None:
    @sgl.function
    def story(s):
        s += "Once upon a time" + sgl.gen("x", max_tokens=4)

    state = story.run(backend=backend, **GREEDY)
    direct = server.client.post("/v1/completions", json={
        "model": backend.model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
    }).json()  # fmt: skip
    assert state.text() == "Once upon a time" + direct["choices"][0]["text"]


@pytest.mark.parametrize("expr, message", [
    (lambda: sgl.select("c", ["a", "b"]), "no log-probabilities"),
    (lambda: sgl.gen("c", regex="[0-9]+"), "cannot constrain output to a regex"),
])  # fmt: skip
def test_what_the_api_cannot_do_fails_clearly(backend, expr, message) -> None:
    @sgl.function
    def prog(s):
        s += "Pick: " + expr()

    err = prog.run(backend=backend).error()
    assert isinstance(err, ValueError) and message in str(err)


# Long enough that a loaded machine, where the server bunches the deltas a slow reader has not
# taken yet, still streams it in more than one piece.
@sgl.function
def story_prog(s):
    s += "Once upon a time" + sgl.gen("x", max_tokens=48)


@sgl.function
def chat_prog(s):
    s += sgl.system("Be brief.")
    s += sgl.user("Tell me a story.")
    s += sgl.assistant(sgl.gen("a", max_tokens=48))


@pytest.mark.parametrize("prog, var", [(story_prog, "x"), (chat_prog, "a")], ids=["completions", "chat"])
def test_streamed_gen_arrives_chunk_by_chunk(backend, prog, var) -> None:
    whole = prog.run(backend=backend, **GREEDY)
    assert whole.error() is None, whole.error()
    assert whole.get_meta_info(var)["completion_tokens"] > 2  # enough tokens to stream in pieces

    streamed = prog.run(backend=backend, stream=True, **GREEDY)
    pieces = list(streamed.text_iter(var))
    assert streamed.error() is None, streamed.error()
    assert len([p for p in pieces if p]) > 1, pieces  # the API streamed it, not one answer at the end
    assert "".join(pieces) == whole[var] == streamed[var]
    assert streamed.text() == whole.text()
    # The last chunk's usage is the state's meta_info, as without streaming.
    meta, whole_meta = streamed.get_meta_info(var), whole.get_meta_info(var)
    for key in ("prompt_tokens", "completion_tokens", "finish_reason"):
        assert meta[key] == whole_meta[key], key
    assert meta["cached_tokens"] > 0  # the same prompt again: loom serve reports the cache hit in usage

    async def collect() -> list[str]:
        state = prog.run(backend=backend, stream=True, **GREEDY)
        return [piece async for piece in state.text_async_iter(var)]

    async_pieces = asyncio.run(collect())
    assert len([p for p in async_pieces if p]) > 1 and "".join(async_pieces) == whole[var]
