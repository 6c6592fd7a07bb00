"""Weight-only quantized linear layers (`quantization`): a GGUF's Q8_0 / Q4_0 / Q4_1 layers are kept
in their own blocks, other quantized types repacked as Q8_0, float checkpoints quantized at load
with int8 / int4; every quantized layer computes x @ dequant(blocks)^T, on the kernel's few rows
and on the band-wise path for many."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from loom.kernels.cpu import dequantize, quantize
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.layers.linear import LinearBase
from loom.runtime.layers.quantized import layer_type
from loom.runtime.models.gguf_file import read_gguf
from loom.runtime.models.loader import load_model
from loom.runtime.server_args import EngineArgumentError, ServerArgs

from gguf_files import Q, write_gguf

pytestmark = pytest.mark.usefixtures("float_activations")  # held to the float reference (conftest.py)


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    # The matrices cycle through the kernel's three types and one K-quant.
    return write_gguf(tmp_path_factory.mktemp("q") / "model.gguf", "llama", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K], seed=5)


def linear_layers(model: torch.nn.Module) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def test_which_layers_stay_quantized():
    assert layer_type("none", {"Q4_1"}) is None
    assert layer_type("auto", {"Q4_1"}) == "Q4_1" and layer_type("auto", {"Q8_0"}) == "Q8_0"
    assert layer_type("auto", {"Q6_K"}) == "Q8_0" and layer_type("auto", {"Q4_0", "Q4_1"}) == "Q8_0"
    assert layer_type("auto", {"F16"}) is None and layer_type("auto", set()) is None
    assert layer_type("int8", set()) == "Q8_0" and layer_type("int4", {"F32"}) == "Q4_1"
    with pytest.raises(EngineArgumentError, match="quantization"):
        ServerArgs(model_path="x", quantization="int3")


def test_auto_keeps_the_files_blocks_and_equals_the_float_layers(gguf_path):
    quantized, _ = load_model(gguf_path, torch.float32, quantization="auto")
    plain, _ = load_model(gguf_path, torch.float32, quantization="none")
    file = read_gguf(gguf_path)
    layers, floats = linear_layers(quantized), linear_layers(plain)
    kept = {name: m.qtype for name, m in layers.items()}
    assert set(kept.values()) <= {"Q8_0", "Q4_0", "Q4_1"} and None not in kept.values(), kept
    # o_proj reads one tensor: its blocks are the file's own bytes (a Q6_K one is repacked as Q8_0).
    for i in range(2):
        name, info = f"model.layers.{i}.self_attn.o_proj", file.tensors[f"blk.{i}.attn_output.weight"]
        if info.type_name in ("Q8_0", "Q4_0", "Q4_1"):
            raw = np.memmap(gguf_path, np.uint8, "r", info.offset, (info.nbytes,)).reshape(info.shape[0], -1)
            assert layers[name].qtype == info.type_name and torch.equal(layers[name].qweight, torch.from_numpy(np.array(raw)))
        else:
            assert layers[name].qtype == "Q8_0"
    gen = torch.Generator().manual_seed(0)
    for name, layer in layers.items():
        assert layer.weight is None and layer.packed_weight is None
        for rows in (1, 7, 40):  # the kernel, and the band-wise path
            x = torch.randn(rows, layer.qweight.shape[1] // {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[layer.qtype] * 32, generator=gen)
            want = floats[name](x) if layer.qtype == file_type(file, name) else x @ dequantize(layer.qweight, layer.qtype, x.shape[1]).T
            torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def file_type(file, module: str) -> str | None:
    """The GGUF type of the tensor(s) behind a linear layer, when they agree."""
    i = module.split(".")[2]
    parts = {"qkv_proj": ("attn_q", "attn_k", "attn_v"), "o_proj": ("attn_output",), "gate_up_proj": ("ffn_gate", "ffn_up"),
             "down_proj": ("ffn_down",)}[module.rsplit(".", 1)[1]]  # fmt: skip
    types = {file.tensors[f"blk.{i}.{p}.weight"].type_name for p in parts}
    return types.pop() if len(types) == 1 else None


@pytest.mark.parametrize("mode, qtype", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_int8_and_int4_quantize_a_float_checkpoint(make_tiny_model, mode, qtype):
    path = make_tiny_model("qwen2", vocab_size=512, seed=4)
    quantized, _ = load_model(path, torch.float32, quantization=mode)
    plain, _ = load_model(path, torch.float32)
    floats = linear_layers(plain)
    for name, layer in linear_layers(quantized).items():
        assert layer.qtype == qtype
        blocks = quantize(floats[name].weight, qtype)
        assert torch.equal(layer.qweight, blocks)
        x = torch.randn(3, floats[name].weight.shape[1])
        want = x @ dequantize(blocks, qtype, x.shape[1]).T + (floats[name].bias if floats[name].bias is not None else 0)
        torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    with LocalEngine(model_path=str(path), quantization=mode, max_total_tokens=1024) as engine:
        out = engine.generate("The cat", {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True})
        assert out["meta_info"]["completion_tokens"] == 6


def test_engine_on_auto_gives_the_float_engines_tokens(gguf_path):
    prompts = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7]]
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    runs = {}
    for mode in ("none", "auto"):
        # fp32: the float engine then holds the dequantised weights exactly (bf16 would round them)
        with LocalEngine(model_path=str(gguf_path), dtype="float32", quantization=mode, max_total_tokens=1024) as engine:
            runs[mode] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert runs["auto"] == runs["none"]


@pytest.mark.parametrize("mode, qtype, tie", [("auto", "Q8_0", True), ("int4", "Q8_0", True), ("auto", "Q8_0", False)])
def test_the_lm_head_is_kept_quantized_too(tmp_path, mode, qtype, tie):
    """Logits from the blocks, dense and sparse. A tied head keeps its float weight (the embedding's,
    for the lookup); an untied one drops it, so no float copy of the head stays in memory."""
    path = write_gguf(tmp_path / "head.gguf", "qwen3", [Q.Q8_0], tie=tie, seed=2)
    model, _ = load_model(path, torch.float32, quantization=mode)
    head = model.lm_head
    assert head.qtype == qtype and head.packed_weight is None
    assert (head.weight is not None) == tie and (head.weight is model.model.embed_tokens.weight) == tie
    hidden = torch.randn(3, head.embedding_dim)
    want = hidden @ dequantize(head.qweight, qtype, hidden.shape[1]).T
    got = head.compute_logits(hidden)
    torch.testing.assert_close(got, want[:, : head.num_embeddings], rtol=1e-4, atol=1e-4 * want.abs().max().item())
    ids = torch.tensor([0, 7, 100])
    torch.testing.assert_close(head.logits_for_ids(hidden[1], ids), got[1, ids], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("tie", [True, False])
def test_the_lm_head_past_the_kernels_rows_dequantises_no_whole_copy(tmp_path, tie):
    """Past the kernel's rows (a batch of 32 decoding) a tied head multiplies the embedding's own
    float weight (the source of its blocks), an untied one its blocks band by band: both give the
    dequantised head's logits, the tied one within Q8_0's rounding of the weight."""
    from loom.runtime.layers.quantized import KERNEL_MAX_ROWS

    path = write_gguf(tmp_path / "head.gguf", "qwen3", [Q.Q8_0], tie=tie, seed=2)
    model, _ = load_model(path, torch.float32, quantization="auto")
    head = model.lm_head
    hidden = torch.randn(KERNEL_MAX_ROWS + 9, head.embedding_dim)
    want = (hidden @ dequantize(head.qweight, head.qtype, hidden.shape[1]).T)[:, : head.num_embeddings]
    got = head.compute_logits(hidden)
    if tie:
        torch.testing.assert_close(got, hidden @ head.weight.T, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=(2e-2 if tie else 1e-4) * want.abs().max().item())


def test_tensor_parallel_ranks_keep_their_shards_blocks(gguf_path):
    """With tp_size=2 each rank keeps its shard quantized (column-parallel: whole output rows;
    row-parallel: half the input features, in whole blocks) and computes what the dequantised shard
    computes: exactly where the file's type is kept, within Q8_0's rounding where it was repacked."""
    file = read_gguf(gguf_path)
    gen = torch.Generator().manual_seed(3)
    for rank in range(2):
        shard = linear_layers(load_model(gguf_path, torch.float32, tp_rank=rank, tp_size=2, quantization="auto")[0])
        floats = linear_layers(load_model(gguf_path, torch.float32, tp_rank=rank, tp_size=2, quantization="none")[0])
        for name, layer in shard.items():
            weight = floats[name].weight
            assert layer.qtype in ("Q8_0", "Q4_0", "Q4_1") and layer.weight is None, name
            x = torch.randn(5, weight.shape[1], generator=gen)
            want, got = x @ weight.T, layer.matmul(x, None)  # this rank's part, before any all-reduce
            if layer.qtype == file_type(file, name):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            else:  # repacked: each weight rounded to its Q8_0 block's step (max |w| / 127) at most by half
                bound = x.abs().sum(-1, keepdim=True) * weight.abs().max() / 254 + 1e-4 * want.abs().max()
                assert ((got - want).abs() <= bound).all(), name
