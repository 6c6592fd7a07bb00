"""The whole engine on the `triton` attention backend gives the same greedy tokens as `torch_native`.

Without a GPU the kernels run under Triton's interpreter, which must be on before Triton is first
imported, so the engines run in a fresh interpreter process with TRITON_INTERPRET=1 in its
environment (this test process, and every other test module, stays without it).
"""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

from interpreted_run import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = r"""
import json, sys
import loom
from loom.runtime.entrypoints.engine import LocalEngine

path = sys.argv[1]
shared = list(range(10, 30))  # a 20-token prefix the later prompts share (radix-cache hits)
prompts = [shared + [40, 41, 42], shared + [50], [7, 8, 9, 60, 61]]
greedy = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}
result = {}
for backend in ("torch_native", "triton"):
    # chunked prefill of 8 tokens: the first prompt's later chunks extend over a cached prefix; fp32,
    # as Triton's interpreter has no bf16 (which dtype "auto" picks on a CPU with native bf16)
    with LocalEngine(model_path=path, dtype="float32", attention_backend=backend, max_total_tokens=512,
                     chunked_prefill_size=8, debug_check_memory=True) as eng:
        first = eng.generate(input_ids=prompts[0], sampling_params=greedy)
        rest = eng.generate(input_ids=prompts[1:], sampling_params=[greedy] * 2)  # one extend + batched decode
        result[backend] = {
            "class": type(eng.model_runner.attn_backend).__name__,
            "tokens": [o["output_ids"] for o in [first, *rest]],
            "cached": [o["meta_info"]["cached_tokens"] for o in [first, *rest]],
        }
print("RESULT", json.dumps(result))
"""


@pytest.mark.slow
def test_triton_engine_matches_torch_native_greedy(tmp_path: pathlib.Path) -> None:
    path = build_tiny_checkpoint(tmp_path / "tiny", arch="llama", hidden_size=64, num_hidden_layers=1)
    result = run_interpreted(SCRIPT, str(path))
    native, triton = result["torch_native"], result["triton"]
    assert native["class"] == "TorchNativeAttnBackend" and triton["class"] == "TritonAttnBackend"
    assert all(len(t) == 6 for t in native["tokens"])
    assert triton["tokens"] == native["tokens"]
    assert triton["cached"] == native["cached"] and native["cached"][1] >= 20, "the shared prefix came from the cache"
