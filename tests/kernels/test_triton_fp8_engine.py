"""The whole engine with an fp8 (e4m3) KV cache on the `triton` attention backend gives the same greedy
tokens as on `torch_native` (whose fp8 path is exact against simulated rounding, see test_fp8_kv.py).

Without a GPU the kernels run under Triton's interpreter, which must be on before Triton is first
imported, so the engines run in a fresh interpreter process with TRITON_INTERPRET=1 in its environment.
"""

from __future__ import annotations

import importlib.util

import pytest

from interpreted_run import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r"""
import json, sys
from loom.runtime.entrypoints.engine import LocalEngine

path = sys.argv[1]
shared = list(range(10, 30))  # a 20-token prefix the later prompts share (radix-cache hits on fp8 K/V)
prompts = [shared + [40, 41, 42], shared + [50], [7, 8, 9, 60, 61]]
greedy = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
result = {}
for backend in ("torch_native", "triton"):
    # chunked prefill of 8 tokens: the first prompt's later chunks extend over a cached fp8 prefix; fp32
    # compute, as Triton's interpreter has no bf16 (which dtype "auto" picks on a CPU with native bf16)
    with LocalEngine(model_path=path, dtype="float32", attention_backend=backend, kv_cache_dtype="fp8_e4m3",
                     max_total_tokens=512, chunked_prefill_size=8, debug_check_memory=True) as eng:
        pool = eng.model_runner.token_to_kv_pool
        first = eng.generate(input_ids=prompts[0], sampling_params=greedy)
        rest = eng.generate(input_ids=prompts[1:], sampling_params=[greedy] * 2)  # one extend + batched decode
        result[backend] = {
            "class": type(eng.model_runner.attn_backend).__name__,
            "kv_dtype": str(pool.k_buffer[0].dtype),
            "scales": [list(pool.k_scale), list(pool.v_scale)],
            "tokens": [o["output_ids"] for o in [first, *rest]],
            "cached": [o["meta_info"]["cached_tokens"] for o in [first, *rest]],
        }
print("RESULT", json.dumps(result))
"""


@pytest.mark.slow
def test_triton_fp8_engine_matches_torch_native_fp8_greedy(make_tiny_model) -> None:
    path = make_tiny_model("qwen2", num_hidden_layers=2)  # 2 layers, each with its own scales; GQA: 4 heads, 2 KV
    result = run_interpreted(SCRIPT, str(path))
    native, triton = result["torch_native"], result["triton"]
    assert native["class"] == "TorchNativeAttnBackend" and triton["class"] == "TritonAttnBackend"
    assert native["kv_dtype"] == triton["kv_dtype"] == "torch.float8_e4m3fn"
    # Both calibrate each layer's scales on its first write: layer 0's from the same k/v, exactly; layer 1's
    # from k/v past a layer of attention computed by different kernels, to fp32 rounding.
    (nk, nv), (tk, tv) = native["scales"], triton["scales"]
    assert (tk[0], tv[0]) == (nk[0], nv[0]) and len(set(nk)) == 2
    assert tk + tv == pytest.approx(nk + nv, rel=1e-5)
    assert all(len(t) == 5 for t in native["tokens"])
    assert triton["tokens"] == native["tokens"]
    assert triton["cached"] == native["cached"] and native["cached"][1] >= 20, "the shared prefix came from the cache"
