"""Golden tests: Loom's greedy tokens equal Transformers' own model on the same fp32 weights.

Every engine here runs in fp32 (`dtype="float32"`), whatever dtype "auto" picks on this CPU (bf16
where it is native): the reference is Transformers in fp32. tests/runtime/test_bf16_golden.py
compares bf16 with bf16.

Every engine here runs with `debug_check_memory=True`, so the KV-pool invariant
(free + evictable + protected + held == capacity) is asserted after every scheduler step.
"""

from __future__ import annotations

import pytest
import torch

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine

from golden import hf_greedy, hf_model, random_prompts

ARCHS = ["llama", "qwen2", "qwen3"]
NEW_TOKENS = 12


@pytest.fixture(scope="module", params=ARCHS)
def arch_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"golden-{request.param}")
    return build_tiny_checkpoint(path, arch=request.param, vocab_size=512, seed=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("golden-llama"), arch="llama", vocab_size=512, seed=2)


def greedy(n: int = NEW_TOKENS) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}


def make_engine(path, **kw) -> LocalEngine:
    kw.setdefault("debug_check_memory", True)
    kw.setdefault("dtype", "float32")  # Transformers' side runs in fp32
    kw.setdefault("max_total_tokens", 4096)
    return LocalEngine(model_path=str(path), **kw)


def assert_golden(path, prompts, outs, n: int = NEW_TOKENS) -> None:
    for i, (p, out) in enumerate(zip(prompts, outs)):
        assert out["output_ids"] == hf_greedy(path, p, n), f"request {i} (prompt of {len(p)} tokens) diverged"


def test_batch_arriving_together(arch_dir):
    prompts = random_prompts(0, 6, 3, 40)
    with make_engine(arch_dir) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy())
    assert_golden(arch_dir, prompts, outs)
    assert all(o["meta_info"]["finish_reason"]["type"] == "length" for o in outs)


def test_staggered_arrivals_join_running_batch(arch_dir):
    """Requests that arrive while others decode join between decode steps (continuous batching)."""
    prompts = random_prompts(1, 4, 5, 30)
    with make_engine(arch_dir) as engine:
        streams = [engine.generate(input_ids=p, sampling_params=greedy(), stream=True) for p in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        active, started = [0], 1
        # Start request k+1 once request k has two tokens out: it joins a running batch.
        while active:
            for k in list(active):
                chunk = next(streams[k], None)
                if chunk is None:
                    active.remove(k)
                    continue
                ids[k] += chunk["output_ids"]
                if len(ids[k]) >= 2 and started == k + 1 < len(prompts):
                    active.append(k + 1)
                    started += 1
        assert started == len(prompts)
        # One at a time would take len(prompts) * (NEW_TOKENS + 1) steps; joined batches share decode steps.
        assert engine.scheduler.stats["steps"] <= NEW_TOKENS + 4 * len(prompts)
    for i, p in enumerate(prompts):
        assert ids[i] == hf_greedy(arch_dir, p, NEW_TOKENS), f"request {i} diverged"


def test_shared_prefix_is_reported_and_exact(arch_dir):
    prefix = random_prompts(2, 1, 60, 60)[0]
    prompts = random_prompts(3, 5, 4, 12, prefix=prefix)
    with make_engine(arch_dir) as engine:
        first = engine.generate(input_ids=prompts[0], sampling_params=greedy())
        rest = engine.generate(input_ids=prompts[1:], sampling_params=greedy())
    assert first["meta_info"]["cached_tokens"] == 0
    for out in rest:
        assert out["meta_info"]["cached_tokens"] >= len(prefix)
    assert_golden(arch_dir, prompts, [first] + rest)


def test_in_batch_prefix_sharing_computes_prefix_once(llama_dir):
    """Many waiting requests with one uncached prefix: one leader prefills it, the rest reuse it."""
    prefix = random_prompts(4, 1, 80, 80)[0]
    prompts = random_prompts(5, 8, 3, 9, prefix=prefix)
    with make_engine(llama_dir) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(4))
        stats = engine.scheduler.stats
    cached = sorted(o["meta_info"]["cached_tokens"] for o in outs)
    assert cached[0] == 0 and all(c >= len(prefix) for c in cached[1:]), cached
    assert stats["cached_tokens"] >= 7 * len(prefix)
    assert_golden(llama_dir, prompts, outs, 4)


def test_small_chunked_prefill(arch_dir):
    prompts = random_prompts(6, 3, 50, 90)
    with make_engine(arch_dir, chunked_prefill_size=16) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy())
    assert_golden(arch_dir, prompts, outs)


def test_tight_memory_evicts_and_retracts(arch_dir):
    """KV pool far smaller than the batch needs: eviction and retraction happen, no request is lost."""
    prompts = random_prompts(7, 8, 20, 40)
    n = 24
    with make_engine(arch_dir, max_total_tokens=160, chunked_prefill_size=64) as engine:
        warm = engine.generate(input_ids=prompts[:2], sampling_params=greedy(n))  # leaves cached prefixes
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(n))
        stats = dict(engine.scheduler.stats)
    assert stats["retracted"] > 0, stats
    assert_golden(arch_dir, prompts[:2], warm, n)
    assert_golden(arch_dir, prompts, outs, n)


def test_radix_cache_off(arch_dir):
    prefix = random_prompts(8, 1, 40, 40)[0]
    prompts = random_prompts(9, 4, 4, 10, prefix=prefix)
    with make_engine(arch_dir, disable_radix_cache=True, chunked_prefill_size=24) as engine:
        engine.generate(input_ids=prompts[0], sampling_params=greedy())
        outs = engine.generate(input_ids=prompts, sampling_params=greedy())
    assert all(o["meta_info"]["cached_tokens"] == 0 for o in outs)
    assert_golden(arch_dir, prompts, outs)


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_policies_give_identical_tokens(llama_dir, policy):
    prefix = random_prompts(10, 1, 30, 30)[0]
    prompts = random_prompts(11, 3, 3, 8) + random_prompts(12, 3, 3, 8, prefix=prefix)
    with make_engine(llama_dir, schedule_policy=policy, max_running_requests=2) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(6))
    assert_golden(llama_dir, prompts, outs, 6)


def test_prompt_and_output_logprobs_match_transformers(arch_dir):
    prompt = random_prompts(13, 1, 30, 30)[0]
    with make_engine(arch_dir) as engine:
        # Cache the prompt first: prompt logprobs must still be computed, not skipped.
        engine.generate(input_ids=prompt, sampling_params=greedy(2))
        out = engine.generate(
            input_ids=prompt, sampling_params=greedy(5), return_logprob=True, logprob_start_len=0, top_logprobs_num=3
        )
    meta = out["meta_info"]
    full = torch.tensor([prompt + out["output_ids"]])
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(arch_dir)(full).logits[0].float(), dim=-1)
    inputs = meta["input_token_logprobs"]
    assert len(inputs) == len(prompt)
    assert inputs[0][0] is None and inputs[0][1] == prompt[0]
    for pos in range(1, len(prompt)):
        lp, tok, text = inputs[pos]
        assert tok == prompt[pos] and text is None
        assert abs(lp - float(ref[pos - 1, tok])) < 1e-4, f"prompt position {pos}"
    outputs = meta["output_token_logprobs"]
    assert [t for _, t, _ in outputs] == out["output_ids"]
    for j, (lp, tok, _) in enumerate(outputs):
        assert abs(lp - float(ref[len(prompt) - 1 + j, tok])) < 1e-4
        top = meta["output_top_logprobs"][j]
        assert len(top) == 3 and top[0][1] == tok  # greedy: the chosen token is the most likely
        ref_top = torch.topk(ref[len(prompt) - 1 + j], 3)
        assert [t for _, t, _ in top] == ref_top.indices.tolist()
    assert len(meta["input_top_logprobs"]) == len(prompt)


def test_logprob_start_len_skips_earlier_prompt_tokens(llama_dir):
    prompt = random_prompts(14, 1, 20, 20)[0]
    with make_engine(llama_dir) as engine:
        out = engine.generate(input_ids=prompt, sampling_params=greedy(1), return_logprob=True, logprob_start_len=15)
    entries = out["meta_info"]["input_token_logprobs"]
    assert [tok for _, tok, _ in entries] == prompt[15:]
    assert all(lp is not None for lp, _, _ in entries)


@pytest.mark.parametrize("start", [0, 7, 19, 20])
def test_prefill_only_logprobs_match_transformers(llama_dir, start):
    """max_new_tokens=0 (choice scoring, cache warming) computes no KV for the last prompt token,
    which nothing follows: its logprob still comes out, equal to Transformers', and a later
    request finds every other prompt token cached."""
    prompt = random_prompts(16, 1, 20, 20)[0]
    with make_engine(llama_dir) as engine:
        out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=start, top_logprobs_num=2)  # fmt: skip
        again = engine.generate(input_ids=prompt + [5], sampling_params=greedy(1))
    meta = out["meta_info"]
    assert out["output_ids"] == [] and meta["prompt_tokens"] == len(prompt)
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(llama_dir)(torch.tensor([prompt])).logits[0].float(), dim=-1)
    entries, tops = meta["input_token_logprobs"], meta["input_top_logprobs"]
    assert [tok for _, tok, _ in entries] == prompt[start:] and len(tops) == len(entries)
    for pos, (lp, tok, _), top in zip(range(start, len(prompt)), entries, tops):
        if pos == 0:
            assert lp is None and top is None
            continue
        assert abs(lp - float(ref[pos - 1, tok])) < 1e-4, f"prompt position {pos}"
        assert [t for _, t, _ in top] == torch.topk(ref[pos - 1], 2).indices.tolist()
    assert again["meta_info"]["cached_tokens"] == len(prompt) - 1


def test_bf16_weights_run(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "bf16", arch="qwen3", dtype="bfloat16", seed=3)
    with make_engine(path, dtype="bfloat16") as engine:
        out = engine.generate(input_ids=[5, 6, 7, 8], sampling_params=greedy(6))
        assert engine.model_runner.dtype == torch.bfloat16
    assert len(out["output_ids"]) == 6


def test_mistral_and_sharded_tied_checkpoint(tmp_path):
    path = build_tiny_checkpoint(tmp_path / "m", arch="mistral", num_shards=3, tie_word_embeddings=True, seed=4)
    prompts = random_prompts(15, 3, 5, 20)
    with make_engine(path) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy())
    assert_golden(path, prompts, outs)
