"""The fused CPU decode step (runtime/model_executor/cpu_decode.py, kernels/cpu/decode.cpp) against the
torch path it replaces: one decode step's hidden states and the K/V it stores, for 1 to 16 rows of
different context lengths, on an odd shape (3 query heads over 1 KV head of 32, hidden 96,
intermediate 160) and on the test GGUF's shape; the same greedy tokens from an engine; and the cases
it leaves to the torch path.

Tolerances: fp32 differs from the torch path by summation order only (relative 1e-5 of the hidden
states). In bf16 both paths round to bf16 at the same points, but attention's softmax is computed
differently (torch's flash kernel blocks and approximates exp), and a bf16 model amplifies such
ulp-level differences through its layers; the fused path must stay within the torch path's own
distance from fp32 (x2)."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.model_executor import cpu_decode
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.server_args import ServerArgs

import gguf_files
from gguf_files import Q, write_gguf

pytestmark = pytest.mark.usefixtures("float_activations")  # held to the float reference (conftest.py)

ODD_SHAPE = (96, 160, 3, 1, 32)  # hidden, intermediate, heads, kv heads, head dim


@pytest.fixture(scope="module")
def odd_gguf(tmp_path_factory):
    saved = gguf_files.SHAPES["llama"]
    gguf_files.SHAPES["llama"] = ODD_SHAPE
    try:
        return write_gguf(tmp_path_factory.mktemp("odd") / "odd.gguf", "llama", [Q.Q4_1, Q.Q8_0, Q.Q4_0], layers=3, seed=11)
    finally:
        gguf_files.SHAPES["llama"] = saved


@pytest.fixture(scope="module")
def plain_gguf(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("plain") / "model.gguf", "llama", [Q.Q4_1], seed=3)


def runner(path, dtype: str, **kw) -> ModelRunner:
    return ModelRunner(ServerArgs(model_path=str(path), quantization="auto", dtype=dtype, max_total_tokens=2048, **kw))


def decode_step(r: ModelRunner, lens: list[int], ids: torch.Tensor, kv: tuple[list, list], fused: bool):
    """One decode step over rows of `lens` tokens (the last one new), KV pool filled from `kv` ->
    (hidden [B, hidden] fp32, the new tokens' K and V of every layer)."""
    pool, table = r.token_to_kv_pool, r.req_to_token_pool.req_to_token
    slots, start = [], 1
    for i, n in enumerate(lens):
        table[i, :n] = torch.arange(start, start + n)
        slots.append(start + n - 1)
        start += n
    for layer in range(r.num_layers):
        pool.k_buffer[layer].copy_(kv[0][layer])
        pool.v_buffer[layer].copy_(kv[1][layer])
    b = len(lens)
    fb = ForwardBatch(ForwardMode.DECODE, b, ids, torch.tensor([n - 1 for n in lens]), torch.tensor(slots), torch.arange(b),
                      torch.tensor(lens), list(lens))  # fmt: skip
    saved = r.cpu_decode
    r.cpu_decode = saved if fused else None
    try:
        hidden = r.forward(fb).float()
    finally:
        r.cpu_decode = saved
    stored = [torch.cat([pool.k_buffer[i][slots], pool.v_buffer[i][slots]]).float() for i in range(r.num_layers)]
    return hidden, torch.stack(stored)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("lens", [[1], [5], [3, 40, 1], [7] * 4 + [1, 30, 2, 64] * 3])
def test_a_decode_step_equals_the_torch_path(odd_gguf, lens):
    """fp32 to summation order; bf16 within the torch bf16 path's own error against fp32."""
    r32, r16 = runner(odd_gguf, "float32"), runner(odd_gguf, "bfloat16")
    assert r32.cpu_decode is not None and r16.cpu_decode is not None
    g = torch.Generator().manual_seed(len(lens))
    kv = tuple([torch.randn(b.shape, generator=g) for b in bufs] for bufs in (r32.token_to_kv_pool.k_buffer, r32.token_to_kv_pool.v_buffer))
    ids = torch.randint(0, r32.vocab_size, (len(lens),), generator=g)
    want, want_kv = decode_step(r32, lens, ids, kv, fused=False)
    got, got_kv = decode_step(r32, lens, ids, kv, fused=True)
    assert got.shape == (len(lens), ODD_SHAPE[0])
    assert rel(got, want) < 1e-5 and rel(got_kv, want_kv) < 1e-5
    kv16 = tuple([t.bfloat16() for t in bufs] for bufs in kv)
    torch16, torch16_kv = decode_step(r16, lens, ids, kv16, fused=False)
    fused16, fused16_kv = decode_step(r16, lens, ids, kv16, fused=True)
    bound = 2 * rel(torch16, want) + 1e-3
    assert rel(fused16, torch16) < bound and rel(fused16, want) < bound
    assert rel(fused16_kv, torch16_kv) < 2 * rel(torch16_kv, want_kv) + 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_engine_decodes_the_same_greedy_tokens(plain_gguf, monkeypatch, dtype):
    """Each prompt alone, and three prompts of different lengths batched, as the scheduler runs them.
    In bf16 the torch path's batched decode (padded, masked attention) is not the same arithmetic as its
    batch of one and may break a near-tie the other way; the fused step attends each row alone, so
    its batch gives its batch-of-one tokens, and those are the torch path's."""
    prompts = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7, 61, 200, 13], [77]]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    batch, alone, logprobs = {}, {}, {}
    for fused in ("1", "0"):
        monkeypatch.setenv(cpu_decode.ENV, fused)
        with LocalEngine(model_path=str(plain_gguf), quantization="auto", dtype=dtype, max_total_tokens=1024) as engine:
            assert (engine.model_runner.cpu_decode is not None) == (fused == "1")
            batch[fused] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
            outs = [engine.generate(input_ids=p, sampling_params=params, return_logprob=True) for p in prompts]
            alone[fused] = [o["output_ids"] for o in outs]
            logprobs[fused] = torch.tensor([[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs])
    assert alone["1"] == alone["0"] and batch["1"] == alone["1"]
    if dtype == "float32":
        assert batch["0"] == batch["1"]
    # bf16 keeps 8 significant bits: a logit near 10 is known to about 0.04 either way.
    torch.testing.assert_close(logprobs["1"], logprobs["0"], rtol=0, atol=1e-4 if dtype == "float32" else 0.06)


def test_what_the_fused_step_leaves_to_torch(plain_gguf, odd_gguf, monkeypatch):
    r = runner(odd_gguf, "float32")
    decode = ForwardBatch(ForwardMode.DECODE, 16, *[torch.zeros(16, dtype=torch.int64)] * 5, [1] * 16)
    assert r.cpu_decode.can_run(decode)
    decode.batch_size = 17  # more rows than the kernel's: bound by the weights, not by dispatch
    assert not r.cpu_decode.can_run(decode)
    decode.batch_size, decode.mode = 1, ForwardMode.EXTEND
    assert not r.cpu_decode.can_run(decode)
    plain = ModelRunner(ServerArgs(model_path=str(plain_gguf), quantization="none", max_total_tokens=256))
    assert plain.cpu_decode is None and "qkv_proj" in cpu_decode.unsupported(plain)
    assert cpu_decode.unsupported(runner(odd_gguf, "float32", kv_cache_dtype="fp8_e4m3")).startswith("dtype")
    monkeypatch.setenv(cpu_decode.ENV, "0")
    assert runner(odd_gguf, "float32").cpu_decode is None
    monkeypatch.setenv(cpu_decode.ENV, "1")
    monkeypatch.setattr(cpu_decode, "extension", lambda: None)  # no compiler: the torch path, no error
    assert cpu_decode.unsupported(r) == "the CPU kernels could not be built"


def test_int8_activations_track_the_float_path(plain_gguf, monkeypatch):
    """The default arithmetic (x in int8 blocks in every quantized layer, llama.cpp's) against x in fp32,
    both on the fused step, greedy: the tokens agree until a near-tie, and the logprobs of the tokens
    both chose stay close. This random-weight model has no trained scale to its activations and moves
    by up to ~0.25 nats a token (a wrong block scale moves it by several); on SmolLM2 the same change
    moves perplexity from 22.78 to 22.72 (llama.cpp: 22.85)."""
    prompts = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7, 61, 200, 13], [77]]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("LOOM_CPU_INT8_ACT", flag)
        with LocalEngine(model_path=str(plain_gguf), quantization="auto", dtype="float32", max_total_tokens=1024) as engine:
            assert engine.model_runner.cpu_decode is not None
            runs[flag] = engine.generate(input_ids=prompts, sampling_params=params, return_logprob=True)
    moved = []
    for int8, fp32 in zip(runs["1"], runs["0"], strict=True):
        for (lp8, t8, _), (lp32, t32, _) in zip(int8["meta_info"]["output_token_logprobs"], fp32["meta_info"]["output_token_logprobs"]):
            if t8 != t32:
                break
            moved.append(abs(lp8 - lp32))
    assert len(moved) >= 18, moved  # of 36 tokens: most steps are not near-ties
    assert max(moved) < 0.4 and sum(moved) / len(moved) < 0.1, moved
    assert runs["1"] != runs["0"]  # the default really is another arithmetic
