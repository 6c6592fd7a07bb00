"""Sampling parameters at the door, and the batched sampler on hand-made logits."""

from __future__ import annotations

import json
import math
from dataclasses import fields

import pytest
import torch

from loom.runtime.model_executor.sampling import (
    SamplingBatchInfo,
    ScratchRows,
    apply_penalties_and_bans,
    compute_logprobs,
    gather_top_logprobs,
    plain_argmax,
    sample,
)
from loom.runtime.sampling_params import MAX_NEW_TOKENS_UNLIMITED, SamplingParams

# ---------------------------------------------------------------------------------- params


def test_defaults_match_sglang():
    p = SamplingParams()
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (128, 0, 1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.seed is None and p.n == 1
    assert (p.ignore_eos, p.skip_special_tokens, p.spaces_between_special_tokens, p.no_stop_trim) == (False, True, True, False)
    assert p.regex is None and p.json_schema is None and p.ebnf is None
    assert SamplingParams.from_dict(None) == p == SamplingParams.from_dict({})
    assert not p.is_greedy


def test_from_dict_takes_every_key_and_round_trips():
    d = {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "repetition_penalty": 1.2,
        "stop": ["\n\n", "END"],
        "stop_token_ids": [2, 7],
        "ignore_eos": True,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "no_stop_trim": True,
        "seed": 1234,
        "n": 3,
        "regex": None,
        "json_schema": '{"type": "object"}',
        "ebnf": None,
        "lark": None,
    }
    assert set(d) == {f.name for f in fields(SamplingParams)}, "the test must cover every field"
    p = SamplingParams.from_dict(d)
    assert p.to_dict() == d
    assert SamplingParams.from_dict(p.to_dict()) == p
    assert json.loads(json.dumps(p.to_dict())) == d  # plain wire values


def test_friendly_forms_are_normalised():
    p = SamplingParams.from_dict(
        {"stop": "###", "json_schema": {"type": "integer"}, "temperature": 0, "top_p": 1, "stop_token_ids": (3, 4)}
    )
    assert p.stop == ["###"]
    assert json.loads(p.json_schema) == {"type": "integer"}
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)
    assert p.stop_token_ids == [3, 4]
    assert p.is_greedy
    assert SamplingParams(stop="x").stop == ["x"]


def test_nulls_mean_defaults_as_sglang_clients_send_them():
    p = SamplingParams.from_dict({"temperature": None, "stop": None, "stop_token_ids": None, "top_k": None, "seed": None})
    assert p == SamplingParams()
    # SGLang: max_new_tokens null = until the context is full (the front clamps it).
    assert SamplingParams.from_dict({"max_new_tokens": None}).max_new_tokens == MAX_NEW_TOKENS_UNLIMITED


def test_sglang_extra_keys_that_ask_for_nothing_are_accepted():
    p = SamplingParams.from_dict(
        {"stop_regex": None, "structural_tag": None, "logit_bias": None, "custom_params": None, "stream_interval": 4}
    )
    assert p == SamplingParams()
    assert SamplingParams.from_dict({"sampling_seed": 42}).seed == 42
    assert SamplingParams.from_dict({"sampling_seed": 42, "seed": 42}).seed == 42


def test_unknown_key_is_refused_with_a_suggestion():
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict({"temprature": 0.5})
    msg = str(err.value)
    assert "unknown sampling parameter 'temprature'" in msg
    assert "did you mean 'temperature'" in msg
    assert "expected one of:" in msg and "max_new_tokens" in msg
    with pytest.raises(ValueError, match="did you mean 'max_new_tokens'"):
        SamplingParams.from_dict({"max_tokens": 5})


@pytest.mark.parametrize("key", ["max_new_tokens", "min_new_tokens", "top_k", "n"])
def test_bools_are_not_ints(key):
    with pytest.raises(ValueError, match=f"sampling_params.{key} must be an int"):
        SamplingParams.from_dict({key: True})


BAD = [
    ({"max_new_tokens": -1}, "sampling_params.max_new_tokens must be an int >= 0, got -1"),
    ({"max_new_tokens": "5"}, "sampling_params.max_new_tokens must be an int >= 0, got '5'"),
    ({"max_new_tokens": 2.0}, "sampling_params.max_new_tokens"),
    ({"min_new_tokens": -1}, "sampling_params.min_new_tokens must be an int >= 0"),
    ({"min_new_tokens": 9, "max_new_tokens": 5}, "sampling_params.min_new_tokens must be <= max_new_tokens (5), got 9"),
    ({"temperature": -1}, "sampling_params.temperature must be a number >= 0, got -1"),
    ({"temperature": "0.5"}, "sampling_params.temperature must be a number >= 0, got '0.5'"),
    ({"temperature": float("nan")}, "sampling_params.temperature"),
    ({"temperature": float("inf")}, "sampling_params.temperature"),
    ({"temperature": 10**400}, "sampling_params.temperature"),
    ({"temperature": False}, "sampling_params.temperature"),
    ({"top_p": 0}, "sampling_params.top_p must be a number in (0, 1], got 0"),
    ({"top_p": 1.01}, "sampling_params.top_p"),
    ({"top_k": -2}, "sampling_params.top_k must be an int: -1 or 0 (disabled) or >= 1, got -2"),
    ({"top_k": 5.0}, "sampling_params.top_k"),
    ({"min_p": -0.1}, "sampling_params.min_p must be a number in [0, 1]"),
    ({"min_p": 1.5}, "sampling_params.min_p"),
    ({"frequency_penalty": 2.5}, "sampling_params.frequency_penalty must be a number in [-2, 2]"),
    ({"frequency_penalty": -2.01}, "sampling_params.frequency_penalty"),
    ({"presence_penalty": 3}, "sampling_params.presence_penalty must be a number in [-2, 2]"),
    ({"repetition_penalty": 0}, "sampling_params.repetition_penalty must be a number in (0, 2]"),
    ({"repetition_penalty": 2.5}, "sampling_params.repetition_penalty"),
    ({"stop": ""}, "sampling_params.stop must be a non-empty string or a list of non-empty strings"),
    ({"stop": ["ok", ""]}, "sampling_params.stop"),
    ({"stop": [1]}, "sampling_params.stop"),
    ({"stop": 5}, "sampling_params.stop"),
    ({"stop_token_ids": [-1]}, "sampling_params.stop_token_ids must hold ints >= 0, got -1"),
    ({"stop_token_ids": ["1"]}, "sampling_params.stop_token_ids"),
    ({"stop_token_ids": [True]}, "sampling_params.stop_token_ids"),
    ({"stop_token_ids": 5}, "sampling_params.stop_token_ids must be a list of ints"),
    ({"ignore_eos": 1}, "sampling_params.ignore_eos must be a bool, got 1"),
    ({"skip_special_tokens": "no"}, "sampling_params.skip_special_tokens must be a bool"),
    ({"spaces_between_special_tokens": 0}, "sampling_params.spaces_between_special_tokens must be a bool"),
    ({"no_stop_trim": "yes"}, "sampling_params.no_stop_trim must be a bool"),
    ({"seed": "1"}, "sampling_params.seed must be an int"),
    ({"seed": 1.0}, "sampling_params.seed"),
    ({"seed": True}, "sampling_params.seed"),
    ({"seed": 2**64}, "sampling_params.seed"),
    ({"sampling_seed": "x"}, "sampling_params.seed"),
    ({"sampling_seed": 1, "seed": 2}, "sampling_params.sampling_seed and sampling_params.seed disagree"),
    ({"n": 0}, "sampling_params.n must be an int >= 1, got 0"),
    ({"regex": 5}, "sampling_params.regex must be a string or null"),
    ({"ebnf": "  "}, "sampling_params.ebnf must be a non-empty grammar"),
    ({"json_schema": "{"}, "sampling_params.json_schema must be valid JSON"),
    ({"json_schema": "[1, 2]"}, "sampling_params.json_schema must be a JSON object"),
    ({"json_schema": 5}, "sampling_params.json_schema must be a string"),
    ({"regex": "a+", "json_schema": "{}"}, "at most one of regex, json_schema, ebnf, lark may be set, got regex, json_schema"),
    ({"regex": "a+", "ebnf": "root ::= 'a'"}, "at most one of regex, json_schema, ebnf"),
    ({"stop_regex": ["a+"]}, "sampling_params.stop_regex is not supported"),
    ({"structural_tag": "{}"}, "sampling_params.structural_tag is not supported"),
    ({"logit_bias": {"5": 1.0}}, "sampling_params.logit_bias is not supported"),
    ({"custom_params": {"k": 1}}, "sampling_params.custom_params needs a custom logit processor"),
    ({"stream_interval": 0}, "sampling_params.stream_interval must be an int >= 1"),
    ({1: 2}, "sampling_params keys must be strings"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[str(b) for b, _ in BAD])
def test_each_bad_value_is_refused_with_its_name(bad, message):
    with pytest.raises(ValueError) as err:
        SamplingParams.from_dict(bad)
    assert message in str(err.value)


def test_not_a_dict_is_refused():
    with pytest.raises(ValueError, match="sampling_params must be a dict, got list"):
        SamplingParams.from_dict([{"temperature": 0}])  # type: ignore[arg-type]


def test_stop_token_ids_checked_against_the_vocabulary():
    p = SamplingParams.from_dict({"stop_token_ids": [3, 99]})
    p.validate(vocab_size=100)
    with pytest.raises(ValueError, match=r"stop_token_ids must hold ints >= 0 and < 50 \(the vocabulary size\), got 99"):
        p.validate(vocab_size=50)


def test_greedy_is_temperature_zero_or_top_k_one():
    assert SamplingParams(temperature=0.0).is_greedy
    assert SamplingParams(temperature=1e-9).is_greedy
    assert SamplingParams(top_k=1).is_greedy
    assert not SamplingParams(temperature=0.1, top_k=2).is_greedy


# ---------------------------------------------------------------------------------- sampler

V = 32


def _info(params, output_ids=None, prompt_ids=None, banned_ids=None, generators=None, vocab_size=V):
    B = len(params)
    return SamplingBatchInfo.from_params(
        params,
        output_ids=output_ids if output_ids is not None else [[] for _ in range(B)],
        vocab_size=vocab_size,
        device="cpu",
        generators=generators,
        prompt_ids=prompt_ids,
        banned_ids=banned_ids,
    )


def _repeat(logits_row: torch.Tensor, n: int) -> torch.Tensor:
    return logits_row.view(1, -1).repeat(n, 1).contiguous()


def test_greedy_rows_are_argmax_even_in_a_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, V) * 3
    expected = torch.argmax(logits, dim=-1)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(8)]
    out = sample(logits.clone(), _info(params))
    assert out.dtype == torch.int64 and out.shape == (8,)
    assert torch.equal(out[0::2], expected[0::2])
    all_greedy = _info([SamplingParams(temperature=0.0)] * 8)
    assert all_greedy.is_all_greedy
    assert torch.equal(sample(logits.clone(), all_greedy), expected)


def test_plain_argmax_is_claimed_only_where_sample_gives_the_argmax():
    """The scheduler skips `SamplingBatchInfo` for such batches (greedy, no penalty) and takes the argmax."""
    torch.manual_seed(3)
    logits = torch.randn(4, V) * 3
    plain = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=0.7), SamplingParams(temperature=0.0, top_p=0.5)]
    assert plain_argmax(plain)
    assert torch.equal(sample(logits[:3].clone(), _info(plain)), torch.argmax(logits[:3], dim=-1))
    for other in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0, frequency_penalty=0.5),
                  SamplingParams(temperature=0.0, presence_penalty=0.1), SamplingParams(temperature=0.0, repetition_penalty=1.3)):  # fmt: skip
        assert not plain_argmax([*plain, other])
    # A penalty moves the greedy token: no shortcut may skip it.
    params = [SamplingParams(temperature=0.0, frequency_penalty=2.0)]
    top = int(torch.argmax(logits[0]))
    assert int(sample(logits[:1].clone(), _info(params, output_ids=[[top] * 8]))) != top


def test_top_k_one_and_tiny_top_p_are_argmax():
    torch.manual_seed(1)
    logits = torch.randn(64, V)
    expected = torch.argmax(logits, dim=-1)
    assert torch.equal(sample(logits.clone(), _info([SamplingParams(temperature=5.0, top_k=1)] * 64)), expected)
    tiny_p = _info([SamplingParams(temperature=1.0, top_p=1e-6)] * 64)
    assert tiny_p.need_top_p and not tiny_p.is_all_greedy
    for _ in range(5):
        assert torch.equal(sample(logits.clone(), tiny_p), expected)


def test_top_k_never_leaves_the_k_best():
    torch.manual_seed(2)
    row = torch.randn(V)
    allowed = set(row.topk(4).indices.tolist())
    out = sample(_repeat(row, 4000), _info([SamplingParams(top_k=4)] * 4000))
    assert set(out.tolist()) == allowed


@pytest.mark.parametrize("neighbour", [SamplingParams(top_k=7), SamplingParams(top_p=0.5), SamplingParams(temperature=0.0)])
def test_each_row_keeps_its_own_top_k_next_to_other_filters(neighbour):
    # With a top-p-only neighbour the whole vocabulary is sorted; otherwise only the best
    # max_top_k are looked at. Either way each row keeps its own k.
    torch.manual_seed(5)
    row = torch.randn(V)
    n = 3000
    params = [SamplingParams(top_k=3)] * n + [neighbour] * n
    info = _info(params)
    assert info.max_top_k == (V if neighbour.top_p < 1 else 7 if neighbour.top_k == 7 else 3)
    out = sample(_repeat(row, 2 * n), info)
    assert set(out[:n].tolist()) == set(row.topk(3).indices.tolist())
    if neighbour.top_k == 7:
        assert set(out[n:].tolist()) == set(row.topk(7).indices.tolist())


def test_half_precision_logits_are_sampled_in_fp32():
    logits = torch.tensor([[0.1, 2.5, -1.0, 2.0]], dtype=torch.bfloat16)
    assert int(sample(logits, _info([SamplingParams(temperature=0.0)], vocab_size=4))) == 1
    assert int(sample(logits, _info([SamplingParams(top_k=2, top_p=0.01)], vocab_size=4))) == 1


def test_min_p_excluded_tokens_are_never_drawn():
    probs = torch.tensor([0.40, 0.30, 0.15, 0.09, 0.03, 0.02, 0.01])  # min_p 0.1 -> threshold 0.04
    out = sample(_repeat(probs.log(), 5000), _info([SamplingParams(min_p=0.1)] * 5000, vocab_size=7))
    assert set(out.tolist()) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_head_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    out = sample(_repeat(probs.log(), 4000), _info([SamplingParams(top_p=0.75)] * 4000, vocab_size=5))
    assert set(out.tolist()) == {0, 1}


def test_top_p_measures_mass_within_what_top_k_kept():
    # top_k=2 leaves [0.4, 0.3] -> renormalised [0.57, 0.43]; top_p=0.5 then keeps only the first.
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    out = sample(_repeat(probs.log(), 2000), _info([SamplingParams(top_k=2, top_p=0.5)] * 2000, vocab_size=4))
    assert set(out.tolist()) == {0}


def test_banned_and_minus_inf_tokens_are_never_drawn():
    logits = torch.zeros(3000, 6)
    logits[:, 5] = float("-inf")
    out = sample(logits, _info([SamplingParams(temperature=2.0)] * 3000, banned_ids=[[0, 1]] * 3000, vocab_size=6))
    assert set(out.tolist()) == {2, 3, 4}


def test_draws_follow_the_tempered_softmax():
    torch.manual_seed(3)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    T, N = 2.0, 40000
    out = sample(_repeat(row, N), _info([SamplingParams(temperature=T)] * N, vocab_size=8))
    observed = torch.bincount(out, minlength=8).double()
    expected = torch.softmax(row.double() / T, dim=-1) * N
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, f"chi-square {chi2:.1f} with 7 degrees of freedom"  # p ~ 1e-4


def _seeded_run(seed: int, batch: str, steps: int = 12) -> list[int]:
    """Sample `steps` tokens for one seeded request, placed in different batches."""
    torch.manual_seed(1000 + len(batch))  # the global RNG differs between compositions
    gen = torch.Generator().manual_seed(seed)
    other = torch.Generator().manual_seed(seed + 1)
    row = torch.linspace(-1.0, 1.0, V)  # flat enough that every draw matters
    tokens = []
    for _ in range(steps):
        if batch == "alone":
            params, gens, logits, pos = [SamplingParams(top_p=0.95)], [gen], row.view(1, -1).clone(), 0
        else:  # two neighbours: one unseeded, one with another seed and other knobs; ours last
            params = [SamplingParams(temperature=0.3), SamplingParams(top_k=5), SamplingParams(top_p=0.95)]
            gens, pos = [None, other, gen], 2
            logits = torch.stack([torch.randn(V), torch.randn(V), row])
        tokens.append(int(sample(logits, _info(params, generators=gens))[pos]))
    return tokens


def test_seeded_rows_are_reproducible_whatever_the_batch():
    alone = _seeded_run(7, "alone")
    assert alone == _seeded_run(7, "alone")
    assert alone == _seeded_run(7, "crowded")
    assert alone != _seeded_run(8, "alone")
    assert len(set(alone)) > 1


def test_greedy_rows_leave_their_generator_untouched():
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    sample(torch.randn(2, V), _info([SamplingParams(temperature=0.0), SamplingParams()], generators=[gen, None]))
    assert torch.equal(gen.get_state(), before)


# ---------------------------------------------------------------------------------- penalties

ROW = [2.0, -1.0, 0.5, 3.0, -2.0, 0.0]


def _penalised(params, output_ids, prompt_ids=None, banned_ids=None):
    logits = torch.tensor([ROW] * len(params))
    apply_penalties_and_bans(logits, _info(params, output_ids, prompt_ids, banned_ids, vocab_size=len(ROW)))
    return logits


def test_no_penalty_builds_no_penalty_state():
    info = _info([SamplingParams()] * 2, output_ids=[[1, 2], [3]])
    assert info.output_counts is None and info.seen_tokens is None and info.banned is None
    assert info.frequency_penalties is None and info.presence_penalties is None and info.repetition_penalties is None


def test_repetition_penalty_divides_positive_and_multiplies_negative_over_prompt_and_output():
    out = _penalised([SamplingParams(repetition_penalty=1.5)], output_ids=[[1, 3, 3]], prompt_ids=[[0, 5]])
    expected = torch.tensor([[2.0 / 1.5, -1.0 * 1.5, 0.5, 3.0 / 1.5, -2.0, 0.0]])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    freq = _penalised([SamplingParams(frequency_penalty=0.5)], output_ids=[[1, 3, 3]], prompt_ids=[[0]])
    torch.testing.assert_close(freq, torch.tensor([[2.0, -1.5, 0.5, 2.0, -2.0, 0.0]]), rtol=0, atol=0)
    pres = _penalised([SamplingParams(presence_penalty=0.25)], output_ids=[[1, 3, 3]], prompt_ids=[[0]])
    torch.testing.assert_close(pres, torch.tensor([[2.0, -1.25, 0.5, 2.75, -2.0, 0.0]]), rtol=0, atol=0)
    negative = _penalised([SamplingParams(frequency_penalty=-1.0)], output_ids=[[4]])
    torch.testing.assert_close(negative, torch.tensor([[2.0, -1.0, 0.5, 3.0, -1.0, 0.0]]), rtol=0, atol=0)


def test_penalties_combine_in_order_and_leave_other_rows_exact():
    params = [
        SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(),
    ]
    out = _penalised(params, output_ids=[[3, 3], [3, 3]], prompt_ids=[[1], [1]])
    # token 1: prompt only -> repetition: -1 * 2; token 3: 3 / 2 - 0.5 * 2 - 0.25
    torch.testing.assert_close(out[0], torch.tensor([2.0, -2.0, 0.5, 0.25, -2.0, 0.0]), rtol=0, atol=0)
    assert torch.equal(out[1], torch.tensor(ROW))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([ROW])
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    assert int(sample(logits.clone(), _info(params, output_ids=[[]], vocab_size=6))) == 3
    assert int(sample(logits.clone(), _info(params, output_ids=[[3]], vocab_size=6))) == 0


def test_min_new_tokens_ban_keeps_eos_out():
    eos = 3  # the argmax
    banned = _penalised([SamplingParams(), SamplingParams()], output_ids=[[], []], banned_ids=[[eos, 0], []])
    assert banned[0, eos] == float("-inf") and banned[0, 0] == float("-inf")
    assert torch.equal(banned[1], torch.tensor(ROW))
    logits = torch.tensor([ROW] * 500)
    greedy = sample(logits.clone(), _info([SamplingParams(temperature=0.0)] * 500, banned_ids=[[eos]] * 500, vocab_size=6))
    assert set(greedy.tolist()) == {0}
    drawn = sample(logits.clone(), _info([SamplingParams(temperature=1.5)] * 500, banned_ids=[[eos]] * 500, vocab_size=6))
    assert eos not in set(drawn.tolist())


# ---------------------------------------------------------------------------------- logprobs


def test_logprobs_are_the_raw_distribution_whatever_sample_does_next():
    torch.manual_seed(4)
    logits = torch.randn(3, V)
    lp = compute_logprobs(logits)
    torch.testing.assert_close(lp, torch.log_softmax(logits, dim=-1))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))
    sample(logits, _info([SamplingParams(repetition_penalty=2.0, temperature=0.5)] * 3, output_ids=[[0, 1]] * 3))
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(3))  # computed before, so untouched


def test_gather_top_logprobs_with_ragged_k():
    logprobs = torch.log_softmax(torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]]), -1)
    top = gather_top_logprobs(logprobs, [3, 0, 1])
    assert [[t for _, t in row] for row in top] == [[1, 3, 2], [], [3]]
    assert all(isinstance(lp, float) and isinstance(t, int) for row in top for lp, t in row)
    assert math.isclose(top[0][0][0], float(logprobs[0, 1]))
    assert gather_top_logprobs(logprobs, [0, 0, 0]) == [[], [], []]
    assert [len(r) for r in gather_top_logprobs(logprobs, [10, 2, 0])] == [4, 2, 0]  # k > V: the whole row


def test_scratch_rows_reuse_one_block_and_logprobs_match():
    """The scheduler's logits/logprobs blocks: handed out again (no fresh 100s-of-MB tensor per
    step), regrown when a step needs more rows, and log_softmax written there equals the plain one."""
    scratch = ScratchRows(min_rows=4)
    assert scratch.get(3, 10, torch.device("cpu")) is None  # few rows: a fresh tensor is cheap
    a = scratch.get(100, 10, torch.device("cpu"))
    b = scratch.get(50, 10, torch.device("cpu"))
    assert a.shape == (100, 10) and b.shape == (50, 10) and a.data_ptr() == b.data_ptr()
    c = scratch.get(300, 10, torch.device("cpu"))
    assert c.shape == (300, 10)
    logits = torch.randn(300, 10)
    assert torch.equal(compute_logprobs(logits, c), torch.log_softmax(logits, dim=-1))
