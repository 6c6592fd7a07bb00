"""The RMSNorm and rotary layers on their Triton kernels (`fused_ops`): torch stays the CPU default, the
kernels run when chosen (under Triton's interpreter on the CPU, on a GPU when there is one) and give what
the torch path gives, layer by layer and through the whole engine (greedy tokens, a tiny fp32 model)."""

from __future__ import annotations

import pytest
import torch

from loom.runtime.layers import FUSED_OPS, RMSNorm, RotaryEmbedding, set_fused_ops
from loom.runtime.layers.fused_ops import use_triton

from interpreted_run import run_interpreted
from triton_setup import CUDA, DEVICE, DTYPES, TOL, interpreter, kt  # noqa: F401  (interpreter: autouse fixture)

ROPE = {"rope_type": "default", "rope_theta": 10000.0}


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts the layers' calls into loom.kernels.triton (they look the kernels up at call time)."""
    calls = {"rmsnorm": 0, "apply_rotary_": 0, "rotate_": 0}
    for name in calls:
        kernel = getattr(kt, name)

        def counted(*args, _kernel=kernel, _name=name, **kwargs):
            calls[_name] += 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(kt, name, counted)
    return calls


def test_torch_is_the_default_off_cuda_and_triton_on_cuda() -> None:
    norm, rope = RMSNorm(8), RotaryEmbedding(8, 16, ROPE)
    assert norm.fused_ops == rope.fused_ops == "auto" and FUSED_OPS == ("auto", "triton", "torch")
    assert not use_triton("auto", torch.zeros(1)) and not use_triton("torch", torch.zeros(1))
    assert use_triton("triton", torch.zeros(1))
    if CUDA:
        assert use_triton("auto", torch.zeros(1, device="cuda"))
    with pytest.raises(ValueError, match=r"unknown fused_ops 'fast'.*\['auto', 'triton', 'torch'\]"):
        RMSNorm(8, fused_ops="fast")


@pytest.mark.skipif(CUDA, reason="the interpreter is for machines without a GPU")
def test_triton_off_cuda_without_the_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET")
    norm = RMSNorm(8, fused_ops="triton")
    norm.weight.fill_(1.0)
    with pytest.raises(ValueError, match="fused_ops='triton' on device 'cpu' needs Triton's interpreter"):
        norm(torch.ones(2, 8))


def make_norm(hidden: int, fused_ops: str, dtype: torch.dtype) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5, fused_ops=fused_ops)
    norm.weight.copy_(torch.rand(hidden, generator=torch.Generator().manual_seed(hidden)) + 0.5)
    return norm.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_layer_on_triton_matches_torch(dtype, kernel_calls) -> None:
    hidden, heads, d = 96, 4, 32
    fused, ref = make_norm(hidden, "triton", dtype), make_norm(hidden, "torch", dtype)
    gen = torch.Generator().manual_seed(2)
    x, residual = (torch.randn(5, hidden, generator=gen).to(DEVICE, dtype) for _ in range(2))
    torch.testing.assert_close(fused(x), ref(x), atol=TOL[dtype], rtol=TOL[dtype])
    out, res = fused(x, residual)
    want_out, want_res = ref(x, residual)
    assert torch.equal(res, want_res)
    torch.testing.assert_close(out, want_out, atol=TOL[dtype], rtol=TOL[dtype])
    # q/k norm: heads viewed out of a qkv row (strided), normalised over head_dim.
    qk_fused, qk_ref = make_norm(d, "triton", dtype), make_norm(d, "torch", dtype)
    qkv = torch.randn(5, 3 * heads * d, generator=gen).to(DEVICE, dtype)
    q = qkv[:, : heads * d].view(5, heads, d)
    got = qk_fused(q)
    assert got.shape == (5, heads, d)
    torch.testing.assert_close(got, qk_ref(q), atol=TOL[dtype], rtol=TOL[dtype])
    assert kernel_calls["rmsnorm"] == 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_layer_on_triton_matches_torch(dtype, kernel_calls) -> None:
    heads, kv_heads, d = 8, 2, 64
    fused = RotaryEmbedding(d, 64, ROPE, fused_ops="triton").to(DEVICE)
    ref = RotaryEmbedding(d, 64, ROPE, fused_ops="torch").to(DEVICE)
    positions = torch.tensor([0, 5, 63, 1, 2, 17], device=DEVICE)  # ragged requests, flattened
    qkv = torch.randn(6, heads + 2 * kv_heads, d, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    want = qkv.clone()
    fused(positions, qkv[:, :heads], qkv[:, heads : heads + kv_heads])
    ref(positions, want[:, :heads], want[:, heads : heads + kv_heads])
    torch.testing.assert_close(qkv, want, atol=TOL[dtype], rtol=TOL[dtype])
    # The packed form, as the Llama attention calls it: q and k heads side by side, one pass.
    fused.forward_packed(positions, qkv[:, : heads + kv_heads])
    ref.forward_packed(positions, want[:, : heads + kv_heads])
    torch.testing.assert_close(qkv, want, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, heads + kv_heads :], want[:, heads + kv_heads :])  # v untouched
    assert kernel_calls["apply_rotary_"] == 1 and kernel_calls["rotate_"] == 1


def test_set_fused_ops_reaches_every_norm_and_the_shared_rotary(make_tiny_model) -> None:
    from loom.runtime.models.loader import load_model

    model, config = load_model(str(make_tiny_model("qwen3", num_hidden_layers=1)), torch.float32, device="cpu")
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    # per layer: input, post-attention, q and k norms; then the final norm; and one shared rotary embedding
    assert len(norms) == 4 * config.num_hidden_layers + 1
    assert set_fused_ops(model, "torch") == len(norms) + 1
    assert all(m.fused_ops == "torch" for m in norms)
    with pytest.raises(ValueError, match="unknown fused_ops"):
        set_fused_ops(model, "yes")


ENGINE_SCRIPT = r"""
import json, sys
import loom.kernels.triton as kt
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.layers import set_fused_ops

calls = {"rmsnorm": 0, "rotary": 0}
def counting(name, kernel):
    def run(*args, **kwargs):
        calls[name] += 1
        return kernel(*args, **kwargs)
    return run
kt.rmsnorm = counting("rmsnorm", kt.rmsnorm)
kt.rotate_ = counting("rotary", kt.rotate_)  # apply_rotary_ calls the module's rotate_ through its own name
kt.apply_rotary_ = counting("rotary", kt.apply_rotary_)

shared = list(range(10, 30))  # a 20-token prefix the later prompts share (radix-cache hits)
prompts = [shared + [40, 41, 42], shared + [50], [7, 8, 9, 60, 61]]
greedy = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
result = {}
for arch, path in zip(sys.argv[1::2], sys.argv[2::2]):
    for choice in ("torch", "triton"):
        # fp32: Triton's interpreter has no bf16 (dtype auto's choice on a CPU with native bf16)
        # chunked prefill of 8 tokens: later chunks extend over a cached prefix
        with LocalEngine(model_path=path, dtype="float32", max_total_tokens=512, chunked_prefill_size=8) as eng:
            layers = set_fused_ops(eng.model_runner.model, choice)
            before = dict(calls)
            first = eng.generate(input_ids=prompts[0], sampling_params=greedy)
            rest = eng.generate(input_ids=prompts[1:], sampling_params=[greedy] * 2)  # one extend + batched decode
            result[f"{arch}/{choice}"] = {
                "layers": layers,
                "calls": {k: calls[k] - before[k] for k in calls},
                "tokens": [o["output_ids"] for o in [first, *rest]],
            }
print("RESULT", json.dumps(result))
"""


@pytest.mark.slow
def test_engine_with_fused_ops_matches_torch_greedy(make_tiny_model) -> None:
    """Llama (rotary over packed q/k) and Qwen3 (q/k norm, then rotary over q and k) on torch_native
    attention: the same greedy tokens with the layers on their kernels as on torch."""
    archs = {arch: make_tiny_model(arch, num_hidden_layers=1) for arch in ("llama", "qwen3")}
    args = [str(x) for arch, path in archs.items() for x in (arch, path)]
    result = run_interpreted(ENGINE_SCRIPT, *args)
    for arch in archs:
        ref, fused = result[f"{arch}/torch"], result[f"{arch}/triton"]
        assert ref["calls"] == {"rmsnorm": 0, "rotary": 0}, "the torch path ran no kernel"
        assert fused["calls"]["rmsnorm"] > 0 and fused["calls"]["rotary"] > 0, fused["calls"]
        assert ref["layers"] == fused["layers"] >= 4
        assert all(len(t) == 5 for t in ref["tokens"])
        assert fused["tokens"] == ref["tokens"], arch
