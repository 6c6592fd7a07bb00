"""The front-end language end to end: programs through `RuntimeEndpoint` against a real
`loom serve` (tiny random model), choice scores checked against Transformers on the same weights."""

from __future__ import annotations

import asyncio
import pathlib
import re
from collections.abc import Iterator
from typing import Any

import pytest

import loom as sgl
from loom.checkpoint_writer import build_tiny_checkpoint
from loom.lang.backend.base import NativeBackend
from loom.lang.backend.transport import HttpTransport
from loom.lang.interpreter import ProgramError
from loom.runtime.protocol import RequestError, ServerError

from server_proc import API_KEY, Server, serving

GREEDY = {"temperature": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("lang"), arch="llama", vocab_size=512, seed=3)


@pytest.fixture(scope="module")
def server(model_dir) -> Iterator[Server]:
    with serving(model_dir, "--api-key", API_KEY, "--dtype", "float32") as srv:  # scores compared with Transformers' fp32
        yield srv


@pytest.fixture(scope="module")
def backend(server) -> sgl.RuntimeEndpoint:
    return sgl.RuntimeEndpoint(server.url, api_key=API_KEY)


class CountingTransport(HttpTransport):
    """Records every /generate body, so tests can see how many requests a program made."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bodies: list[dict[str, Any]] = []

    def generate(self, body: dict[str, Any]) -> Any:
        self.bodies.append(body)
        return super().generate(body)


@pytest.fixture(scope="module")
def hf(model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def hf_token_logprobs(hf, ids: list[int]) -> list[float | None]:
    """logp(ids[i] | ids[:i]) with Transformers; None for the first token."""
    import torch

    model, _ = hf
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [None] + [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]


def hf_choice_logprobs(hf, prompt: str, choice: str) -> tuple[list[int], list[float]]:
    """The choice's own tokens (where prompt+choice stops matching the prompt's tokens) and their logprobs."""
    _, tok = hf
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    full = tok.encode(prompt + choice, add_special_tokens=False)
    k = 0
    while k < min(len(prompt_ids), len(full)) and full[k] == prompt_ids[k]:
        k += 1
    return full[k:], hf_token_logprobs(hf, full)[k:]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- gen, roles, state


def test_gen_appends_what_generate_returns(backend, server) -> None:
    @sgl.function
    def story(s, opening):
        s += opening + sgl.gen("next", max_tokens=6, ignore_eos=True)

    state = story.run(opening="Once upon a time", backend=backend, **GREEDY)
    direct = server.client.post("/generate", json={
        "text": "Once upon a time", "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    }).json()  # fmt: skip
    assert state.error() is None
    assert state["next"] == direct["text"]
    assert state.text() == "Once upon a time" + direct["text"]
    meta = state.get_meta_info("next")
    assert meta["completion_tokens"] == 6 and meta["prompt_tokens"] == direct["meta_info"]["prompt_tokens"]


def test_chat_roles_follow_the_models_template(backend, hf) -> None:
    @sgl.function
    def chat(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Say hello.")
        with s.assistant():
            s += sgl.gen("reply", max_tokens=4, ignore_eos=True)
        s += sgl.user_begin() + "Thanks" + sgl.user_end()

    state = chat.run(backend=backend, **GREEDY)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."},
                {"role": "assistant", "content": state["reply"]}, {"role": "user", "content": "Thanks"}]  # fmt: skip
    assert state.messages() == messages
    assert state.text() == hf[1].apply_chat_template(messages, tokenize=False)


def test_var_scope_gen_int_and_regex(backend) -> None:
    @sgl.function
    def prog(s):
        with s.var_scope("intro"):
            s += "Numbers: one, two, three."
        s += " Count: " + sgl.gen_int("n", max_tokens=6)
        s += "\nCode: " + sgl.gen("code", regex=r"[A-Z]{3}-[0-9]{2}", max_tokens=12)

    state = prog.run(backend=backend, **GREEDY)
    assert state.error() is None
    assert state["intro"] == "Numbers: one, two, three."
    assert re.fullmatch(r"[-+]?[0-9]+[ \n]*", state["n"])
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{2}", state["code"])


# ----------------------------------------------------------------------------- select


PROMPT = "Q: What color is the sky?\nA: The sky is"
CHOICES = [" blue", " green and yellow", " red", "\n"]


@pytest.mark.parametrize("method", ["token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized"])
def test_select_picks_the_argmax_of_the_documented_score(backend, hf, method) -> None:
    @sgl.function
    def pick(s):
        s += PROMPT + sgl.select("color", CHOICES, choices_method=getattr(sgl, method))

    state = pick.run(backend=backend)
    meta = state.get_meta_info("color")
    expected = [hf_choice_logprobs(hf, PROMPT, c) for c in CHOICES]
    # The runtime measured the same tokens and log-probabilities as Transformers.
    assert meta["choice_token_ids"] == [ids for ids, _ in expected]
    for got, (_, want) in zip(meta["choice_token_logprobs"], expected):
        assert got == pytest.approx(want, abs=2e-3)
    if method == "token_length_normalized":
        scores = [sum(lps) / len(lps) for _, lps in expected]
    elif method == "unconditional_likelihood_normalized":
        scores = []
        for ids, lps in expected:
            uncond = [u or 0.0 for u in hf_token_logprobs(hf, ids)]
            scores.append(sum(c - u for c, u in zip(lps, uncond)) / len(lps))
    else:  # greedy: first token decides unless tied; pad shorter choices with their mean
        firsts = [lps[0] for _, lps in expected]
        scores = firsts
    assert state["color"] == CHOICES[max(range(len(CHOICES)), key=scores.__getitem__)]
    assert state.text() == PROMPT + state["color"]


def test_select_boundary_merges_into_the_choice(backend, hf) -> None:
    """A prompt ending in a space: ' blue' is one token, so the choice 'blue' is scored with the
    space token merged in, the way the text would actually be tokenized."""
    prompt = "The sky is "

    @sgl.function
    def pick(s):
        s += prompt + sgl.select("c", ["blue", "green"])

    state = pick.run(backend=backend)
    meta = state.get_meta_info("c")
    for choice, ids, lps in zip(["blue", "green"], meta["choice_token_ids"], meta["choice_token_logprobs"]):
        want_ids, want = hf_choice_logprobs(hf, prompt, choice)
        assert ids == want_ids and lps == pytest.approx(want, abs=2e-3)


def test_select_scores_all_choices_in_one_batched_request(server) -> None:
    counting = CountingTransport(server.url, API_KEY)
    backend = NativeBackend(counting)

    @sgl.function
    def prog(s):
        s += "Hello there! How are you" + sgl.gen("g", max_tokens=3, ignore_eos=True)
        s += " I feel" + sgl.select("mood", [" fine", " bad", " great today"])

    state = prog.run(backend=backend, **GREEDY)
    assert state.error() is None and state["mood"] in (" fine", " bad", " great today")
    assert len(counting.bodies) == 2  # the gen, then one request for all three choices
    batch = counting.bodies[1]
    assert isinstance(batch["text"], list) and len(batch["text"]) == 3
    assert batch["sampling_params"]["max_new_tokens"] == 0
    # The scoring request reused the prompt the gen had cached.
    assert state.get_meta_info("mood")["cached_tokens"] > 0


# ----------------------------------------------------------------------------- fork, batch


def test_fork_branches_hit_the_cache_and_join(backend) -> None:
    sgl.flush_cache(backend)

    @sgl.function
    def tree(s):
        s += "A language model reads a sequence of tokens and predicts the next one. Three ideas:\n"
        forks = s.fork(3)
        forks += lambda i: f"{i + 1}." + sgl.gen("idea", max_tokens=5, ignore_eos=True)
        forks[0] += " (first)"
        forks.join()
        s += "Done."

    state = tree.run(backend=backend, **GREEDY)
    assert state.error() is None
    ideas = state["idea"]
    assert isinstance(ideas, list) and len(ideas) == 3
    metas = state.get_meta_info("idea")["forks"]
    assert all(m["cached_tokens"] > 0 for m in metas)  # the fork's prefill put the prefix in the cache
    assert state.text().endswith("Three ideas:\nDone.")

    @sgl.function
    def appended(s):
        s += "Say hello in three languages:"
        forks = s.fork(2)
        forks += [" one", " two"]
        forks.join("concate_and_append")

    assert appended.run(backend=backend).text() == "Say hello in three languages: one two"


def test_concate_and_append_join_leaves_the_first_branch_cached(backend) -> None:
    """The joined text is SGLang's (the parent's, then each branch's new text in order), and the
    parent's next gen finds the fork prefix and the first branch's whole text in the cache."""
    sgl.flush_cache(backend)
    prefix = "A language model reads a sequence of tokens and predicts the next one. Two drafts:\n"

    @sgl.function
    def drafts(s):
        s += prefix
        forks = s.fork(2)
        forks += lambda i: f"Draft {i + 1}:" + sgl.gen("draft", max_tokens=6, ignore_eos=True) + "\n"
        forks.join("concate_and_append")
        s += "Verdict:" + sgl.gen("verdict", max_tokens=3, ignore_eos=True)
        return forks

    state = drafts.run(backend=backend, **GREEDY)
    assert state.error() is None, state.error()
    forks = state.ret_value
    new_texts = [f.text()[len(prefix):] for f in forks]
    assert [t.startswith(f"Draft {i + 1}:") for i, t in enumerate(new_texts)] == [True, True]
    assert state.text() == prefix + "".join(new_texts) + "Verdict:" + state["verdict"]

    (fork_commit,) = [r for r in state.stream_executor.trace_records() if getattr(r, "kind", "") == "commit"]
    (join_commit,) = [r for r in forks[0].stream_executor.trace_records() if getattr(r, "kind", "") == "join"]
    assert not [r for r in forks[1].stream_executor.trace_records() if getattr(r, "kind", "") == "join"]
    # The join's prefill of branch 0 found what that branch computed (its gen's prompt) cached...
    draft0 = forks[0].get_meta_info("draft")
    assert join_commit.cached_tokens >= draft0["prompt_tokens"] - 1
    # ...and the parent's next gen reuses all of branch 0's text, well past the fork's prefix (a
    # token merged across the boundary with branch 1's text may be recomputed).
    verdict = state.get_meta_info("verdict")
    assert verdict["cached_tokens"] >= join_commit.prompt_tokens - 1
    assert join_commit.prompt_tokens - 1 > fork_commit.prompt_tokens
    assert verdict["prompt_tokens"] > verdict["cached_tokens"]  # branch 1's text is new in this context


FEW_SHOT = "".join(f"Q: What is {a} plus {b}?\nA: {a + b}\n" for a, b in [(2, 3), (10, 7), (4, 4), (6, 1), (9, 9)])


def test_run_batch_warms_the_shared_prefix(backend) -> None:
    sgl.flush_cache(backend)

    @sgl.function
    def add(s, a, b):
        s += FEW_SHOT + f"Q: What is {a} plus {b}?\nA:" + sgl.gen("answer", max_tokens=3, ignore_eos=True)

    states = add.run_batch([{"a": i, "b": i + 1} for i in range(6)], backend=backend, num_threads=6, progress_bar=True, **GREEDY)
    assert [s.error() for s in states] == [None] * 6
    assert [s.text().split("\n")[-1].startswith("A:") for s in states] == [True] * 6
    assert [f"What is {i} plus {i + 1}?" in s.text() for i, s in enumerate(states)] == [True] * 6
    shared = len(FEW_SHOT) // 8  # far fewer tokens than characters; any hit on the few-shot block counts
    assert all(s.get_meta_info("answer")["cached_tokens"] > shared for s in states)


def test_run_batch_generator_style_yields_states_in_order(backend) -> None:
    """generator_style=True: an iterator, the programs already running, each state in input order as
    it is done; the same states (and answers) as the list form."""

    @sgl.function
    def add(s, a, b):
        s += FEW_SHOT + f"Q: What is {a} plus {b}?\nA:" + sgl.gen("answer", max_tokens=3, ignore_eos=True)

    batch = [{"a": i, "b": i + 1} for i in range(5)]
    listed = add.run_batch(batch, backend=backend, num_threads=3, **GREEDY)
    it = add.run_batch(batch, backend=backend, num_threads=3, generator_style=True, progress_bar=True, **GREEDY)
    assert not isinstance(it, list)
    seen = []
    for state in it:
        assert state.error() is None
        seen.append(state)
    assert [s.text() for s in seen] == [s.text() for s in listed]
    assert [f"What is {i} plus {i + 1}?" in s.text() for i, s in enumerate(seen)] == [True] * 5


def test_errors_reach_the_state_and_run_batch_returns(backend) -> None:
    @sgl.function
    def prog(s, mode):
        s += "Hello there!"
        if mode == "raise":
            raise KeyError("boom in the program")
        s += sgl.gen("x", max_tokens=3, regex="(" if mode == "bad" else None)

    states = prog.run_batch([{"mode": "ok"}, {"mode": "raise"}, {"mode": "bad"}, {"mode": "ok"}], backend=backend, **GREEDY)
    assert states[0].error() is None and states[3].error() is None
    assert isinstance(states[1].error(), KeyError)
    err = states[2].error()
    assert isinstance(err, RequestError) and err.status == 400 and "regex" in str(err)
    with pytest.raises(ProgramError, match="failed before setting 'x'"):
        states[2]["x"]

    with pytest.raises(KeyError, match="boom"):
        prog.run(mode="raise", backend=backend)
    state = prog.run(mode="bad", backend=backend)
    assert isinstance(state.error(), RequestError)
    with pytest.raises(KeyError, match="no variable 'missing'"):
        prog.run(mode="ok", backend=backend)["missing"]


def test_a_server_that_is_gone_fails_the_program(model_dir) -> None:
    srv = Server(model_dir).wait_ready()
    backend = sgl.RuntimeEndpoint(srv.url)
    srv.stop()

    @sgl.function
    def prog(s):
        s += "Hi" + sgl.gen("x", max_tokens=2)

    states = prog.run_batch([{}, {}], backend=backend)
    assert all(isinstance(s.error(), ServerError) for s in states)


# ----------------------------------------------------------------------------- streaming


def test_streaming_yields_the_text_in_order(backend) -> None:
    @sgl.function
    def prog(s):
        s += "Once upon a time"
        s += sgl.gen("a", max_tokens=64, ignore_eos=True)
        s += " and then"
        s += sgl.gen("b", max_tokens=4, ignore_eos=True)

    state = prog.run(backend=backend, stream=True, **GREEDY)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.text()
    # Token by token, not one lump per gen. A reader that falls behind gets what arrived meanwhile
    # in one piece (async_engine takes everything queued), and on a loaded machine 8 steps of a tiny
    # model once came as one: 64 tokens leave room for that.
    assert pieces[0] == "Once upon a time" and len(pieces) > 4
    assert "".join(state.text_iter("a")) == state["a"]

    async def collect() -> list[str]:
        return [p async for p in prog.run(backend=backend, stream=True, **GREEDY).text_async_iter("b")]

    assert "".join(asyncio.run(collect())) == state["b"]
    # The same program without streaming produces the same text (greedy).
    assert prog.run(backend=backend, **GREEDY).text() == state.text()


def test_default_backend_bind_and_trace(backend) -> None:
    @sgl.function
    def greet(s, name, punct):
        s += "Hello " + name + punct + sgl.gen("rest", max_tokens=2)

    sgl.set_default_backend(backend)
    try:
        state = greet.bind(punct="!")("Anna", **GREEDY)
    finally:
        sgl.set_default_backend(None)
    assert state.text().startswith("Hello Anna!")
    nodes = greet.trace(name="Bo", punct="?")
    assert [type(n).__name__ for n in nodes] == ["Text", "Gen"]
    with pytest.raises(ValueError, match="no backend"):
        greet.run(name="x", punct=".")
