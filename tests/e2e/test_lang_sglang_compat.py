"""The real SGLang front end (`pip install --no-deps sglang` plus its small deps, see .ci/setup)
running a program against `loom serve` through SGLang's own `RuntimeEndpoint`."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterator

import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server, serving

if os.environ.get("LOOM_REQUIRE_SGLANG") == "1":
    import sglang as sgl  # CI installs it (.ci/setup): an install that cannot import must fail, not skip
else:
    sgl = pytest.importorskip("sglang", reason="the SGLang front end is not installed (see .ci/setup)")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    model: pathlib.Path = build_tiny_checkpoint(tmp_path_factory.mktemp("sglang"), arch="qwen2", vocab_size=512, seed=9)
    with serving(model) as srv:
        yield srv


def test_sglang_program_runs_against_loom_serve(server) -> None:
    backend = sgl.RuntimeEndpoint(server.url)

    @sgl.function
    def prog(s, question):
        s += "Q: " + question + "\nA:" + sgl.gen("answer", max_tokens=6, temperature=0, ignore_eos=True)
        s += "\nColor:" + sgl.select("color", [" blue", " red", " green"])
        s += "\nCode: " + sgl.gen("code", regex=r"[A-Z]{3}-[0-9]{2}", max_tokens=12)
        forks = s.fork(2)
        forks += sgl.gen("idea", max_tokens=4, temperature=0, ignore_eos=True)
        forks.join()

    state = prog.run(question="What color is the sky?", backend=backend)
    direct = server.client.post("/generate", json={
        "text": "Q: What color is the sky?\nA:", "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
    }).json()  # fmt: skip
    assert state["answer"] == direct["text"]
    assert state["color"] in (" blue", " red", " green")
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", state["code"])
    assert isinstance(state["idea"], list) and len(state["idea"]) == 2
    assert state["idea"][0] == state["idea"][1]  # greedy branches from the same prefix agree
    assert state.text() == ("Q: What color is the sky?\nA:" + state["answer"] + "\nColor:" + state["color"]
                            + "\nCode: " + state["code"])  # fmt: skip
    assert state.get_meta_info("answer")["completion_tokens"] == 6


def test_sglang_run_batch_and_streaming(server) -> None:
    backend = sgl.RuntimeEndpoint(server.url)

    @sgl.function
    def prog(s, n):
        s += f"Count to {n}:" + sgl.gen("out", max_tokens=4, temperature=0, ignore_eos=True)

    states = prog.run_batch([{"n": i} for i in range(3)], backend=backend)
    assert all(st["out"] and st.text().startswith(f"Count to {i}:") for i, st in enumerate(states))
    streamed = prog.run(1, backend=backend, stream=True)  # positional: sglang 0.5.23 drops keyword args when streaming
    assert "".join(streamed.text_iter()) == "Count to 1:" + states[1]["out"]
