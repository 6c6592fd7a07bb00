"""fp8 (e4m3) KV cache: per-layer scales, a quarter of fp32's memory, and outputs close to the
full-precision cache on the same weights."""

from __future__ import annotations

import pytest
import torch

import loom.radix_cache.memory_pool as mp
from loom.radix_cache import TokenToKVPool
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.server_args import ServerArgs


def test_pool_round_trip_error_is_fp8_sized_and_scales_are_per_layer():
    torch.manual_seed(0)
    pool = TokenToKVPool(64, torch.float32, 2, 16, 2, kv_dtype=torch.float8_e4m3fn)
    full = TokenToKVPool(64, torch.float32, 2, 16, 2)
    assert pool.mem_bytes() * 4 == full.mem_bytes()
    loc = torch.arange(1, 33)
    for layer, magnitude in ((0, 1.0), (1, 50.0)):
        k, v = torch.randn(32, 2, 16) * magnitude, torch.randn(32, 2, 16) * magnitude / 10
        pool.set_kv_buffer(layer, loc, k, v)
        kd = pool.dequantize(layer, "k", pool.k_buffer[layer][loc])
        vd = pool.dequantize(layer, "v", pool.v_buffer[layer][loc])
        assert kd.dtype == torch.float32
        # e4m3 keeps 3 mantissa bits: relative error <= 1/16 for normal values, plus the subnormal floor.
        for x, xd, s in ((k, kd, pool.k_scale[layer]), (v, vd, pool.v_scale[layer])):
            assert ((xd - x).abs() <= x.abs() / 16 + s * 2**-9).all()
    assert pool.k_scale[1] > 10 * pool.k_scale[0]  # each layer has its own scale
    # Values beyond the calibrated range saturate instead of turning into inf/nan.
    pool.set_kv_buffer(0, loc[:1], torch.full((1, 2, 16), 1e6), torch.zeros(1, 2, 16))
    assert torch.isfinite(pool.dequantize(0, "k", pool.k_buffer[0][loc[:1]])).all()


def test_bad_kv_dtype_is_named():
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServerArgs(model_path="x", kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        TokenToKVPool(8, torch.float32, 1, 8, 1, kv_dtype=torch.float8_e5m2)


def _score(engine, seqs):
    out = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    return [x[0] for r in out for x in r["meta_info"]["input_token_logprobs"][1:]]


def test_engine_with_fp8_kv_equals_full_precision_with_simulated_rounding(make_tiny_model):
    """The fp8 engine must compute exactly what an fp32 engine computes when every K/V it stores is
    rounded to e4m3 at the same per-layer scales: then the only difference is the rounding itself.
    (How much that rounding costs on a real-shaped model is measured in benchmarks/bench_kv_fp8.py.)"""
    model = str(make_tiny_model("qwen2"))
    prompts = ["The quick brown fox jumps over", "Once upon a time in a land far", "Hello there, how are"]
    params = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
    with LocalEngine(model_path=model, dtype="float32", max_total_tokens=512, kv_cache_dtype="fp8_e4m3") as eng:
        pool = eng.model_runner.token_to_kv_pool
        assert pool.quantized and pool.k_buffer[0].dtype == torch.float8_e4m3fn
        got = eng.generate(prompts, params)
        seqs = [eng.tokenizer.encode(p) + g["output_ids"] for p, g in zip(prompts, got)]
        scored = _score(eng, seqs)
        scales = (list(pool.k_scale), list(pool.v_scale))
        assert all(s is not None for s in scales[0]) and len(set(scales[0])) > 1  # one scale per layer
    with LocalEngine(model_path=model, dtype="float32", max_total_tokens=512) as ref:
        sim = ref.model_runner.token_to_kv_pool
        store = sim.set_kv_buffer

        def rounded(layer, loc, k, v):
            fake = [mp._quantize(x, s[layer]).to(x.dtype) * s[layer] for x, s in ((k, scales[0]), (v, scales[1]))]
            store(layer, loc, *fake)

        sim.set_kv_buffer = rounded
        assert [r["output_ids"] for r in ref.generate(prompts, params)] == [g["output_ids"] for g in got]
        assert _score(ref, seqs) == pytest.approx(scored, abs=1e-4)


def test_backends_without_fp8_support_are_refused_at_start(make_tiny_model):
    with pytest.raises(ValueError, match="fp8_e4m3.*'torch_native' or 'triton'"):
        LocalEngine(model_path=str(make_tiny_model("llama")), max_total_tokens=128, kv_cache_dtype="fp8_e4m3",
                    attention_backend="flashinfer")  # fmt: skip
