"""GPTQ and AWQ checkpoints (runtime/models/gptq_awq.py): written on the fly (tests/support/gptq_files.py),
read as vLLM reads them, and kept quantized as Q4_1 blocks under quantization="auto".

The reference is this file's own dequantisation of the written tensors, straight from the documented
layouts (numpy, no Loom code): weight[o, i] = scale[g, o] * (code - zero), g = g_idx[i], with
GPTQ's classic zeros stored minus one and AWQ's words interleaved.

Tolerance: a Q4_1 block holds d = scale and m = -zero * scale, both fp16. d is the file's fp16 scale,
exact; m is rounded to fp16, which moves each weight by at most half an fp16 ulp of m, 2^-11 |zero *
scale| (nothing for the symmetric zero 8). A layer's output may so differ from the reference by
sum_i |x_i| 2^-11 |zero * scale| (the bound used below), plus float32 summation-order noise.
"""

from __future__ import annotations

import json
import logging
import pathlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.layers.linear import LinearBase
from loom.runtime.layers.quantized import runs_on
from loom.runtime.models.gptq_awq import QuantizedCheckpointError, keeps_quantized, parse_quant_config
from loom.runtime.models.loader import load_model

from gptq_files import write_quantized_checkpoint

pytestmark = pytest.mark.usefixtures("float_activations")  # held to the float reference (conftest.py)

# hidden 128 and intermediate 256: group sizes 32, 64 and 128 and act-order all divide every layer.
SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
FORMATS = {
    "gptq-g32": {"method": "gptq", "group_size": 32},
    "gptq-g64-sym": {"method": "gptq", "group_size": 64, "sym": True},
    "gptq-g128-act-order": {"method": "gptq", "group_size": 128, "desc_act": True},
    "gptq-g32-act-order-sym": {"method": "gptq", "group_size": 32, "desc_act": True, "sym": True},
    "gptq_v2-g64": {"method": "gptq", "group_size": 64, "checkpoint_format": "gptq_v2"},
    "gptq-per-row": {"method": "gptq", "group_size": -1},
    "awq-g32": {"method": "awq", "group_size": 32},
    "awq-g64": {"method": "awq", "group_size": 64},
    "awq-g128": {"method": "awq", "group_size": 128},
}
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@pytest.fixture(scope="module")
def float_dir(make_tiny_model):
    return make_tiny_model("llama", seed=11, **SHAPE)


@pytest.fixture(scope="module")
def checkpoints(float_dir, tmp_path_factory):
    """name -> a written checkpoint folder, made on first use."""
    made: dict[str, pathlib.Path] = {}

    def get(name: str) -> pathlib.Path:
        if name not in made:
            made[name] = write_quantized_checkpoint(float_dir, tmp_path_factory.mktemp(name), seed=3, **FORMATS[name])
        return made[name]

    return get


# ----------------------------------------------------------------------------- the reference


def _fields(words: np.ndarray) -> np.ndarray:
    """int32 [..., n] -> [..., n, 8]: field i is bits 4 i .. 4 i + 3."""
    u = words.view(np.uint32)[..., None]
    return ((u >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.int64)


def reference(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Checkpoint module name (e.g. model.layers.0.self_attn.q_proj) -> (weight, zero * scale), float32 [out, in]."""
    quant = json.loads((path / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(path / "model.safetensors"))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        qweight, qzeros = tensors[name], tensors[f"{prefix}.qzeros"]
        scales = tensors[f"{prefix}.scales"].astype(np.float32)
        if quant["quant_method"] == "gptq":
            codes = _fields(qweight).transpose(0, 2, 1).reshape(-1, qweight.shape[1]).T  # [out, in]
            zeros = _fields(qzeros).reshape(qzeros.shape[0], -1)  # [groups, out]
            if quant.get("checkpoint_format", "gptq") == "gptq":
                zeros = zeros + 1  # the classic format stores zero - 1
            g_idx = tensors[f"{prefix}.g_idx"].astype(np.int64)
        else:
            # AWQ: the word's field i holds output 8 c + [0, 2, 4, 6, 1, 3, 5, 7][i]; output 8 c + k is field [0, 4, 1, 5, 2, 6, 3, 7][k].
            unorder = [0, 4, 1, 5, 2, 6, 3, 7]
            codes = _fields(qweight)[..., unorder].reshape(qweight.shape[0], -1).T  # [out, in]
            zeros = _fields(qzeros)[..., unorder].reshape(qzeros.shape[0], -1)
            size = codes.shape[1] if quant["group_size"] == -1 else quant["group_size"]
            g_idx = np.arange(codes.shape[1]) // size
        z, s = zeros[g_idx].T.astype(np.float32), scales[g_idx].T  # [out, in]
        out[prefix] = ((codes - z) * s).astype(np.float32), (z * s).astype(np.float32)
    return out


def reference_layer(ref: dict, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Loom linear layer's (weight, zero * scale): its checkpoint projections stacked as it packs them."""
    prefix, _, last = module.rpartition(".")
    parts = [ref[f"{prefix}.{p}"] for p in PACKED.get(last, (last,))]
    return torch.from_numpy(np.concatenate([w for w, _ in parts])), torch.from_numpy(np.concatenate([zs for _, zs in parts]))


def write_dequantized(quantized: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """The same model as a float checkpoint holding the reference's dequantised weights."""
    shutil.copytree(quantized, dst)
    config = json.loads((dst / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))
    tensors = {
        k: v
        for k, v in load_file(str(quantized / "model.safetensors")).items()
        if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))
    }
    tensors |= {f"{prefix}.weight": np.ascontiguousarray(w) for prefix, (w, _) in reference(quantized).items()}
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def linear_layers(model: torch.nn.Module) -> dict[str, LinearBase]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearBase)}


def assert_within_m_rounding(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, zs: torch.Tensor) -> None:
    """got == x @ weight.T up to the fp16 rounding of m (module docstring) and float32 summation noise."""
    want = x @ weight.T
    bound = x.abs() @ (zs.abs() * 2.0**-11).T + 1e-5 * (x.abs() @ weight.abs().T) + 1e-6
    excess = (got - want).abs() - bound
    assert excess.max().item() <= 0, f"off by {(got - want).abs().max().item():.3g} beyond the bound"


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("name", list(FORMATS))
def test_each_layer_equals_the_dequantised_reference(checkpoints, name):
    path = checkpoints(name)
    model, _ = load_model(path, torch.float32, quantization="auto")
    ref = reference(path)
    gen = torch.Generator().manual_seed(0)
    act_order = FORMATS[name].get("desc_act", False)
    layers = linear_layers(model)
    for module, layer in layers.items():
        assert layer.qtype == "Q4_1" and layer.weight is None, module
        assert act_order or layer.input_perm is None, module  # plain checkpoints keep the features' order
        weight, zs = reference_layer(ref, module)
        for rows in (1, 3, 16, 17, 64):  # the kernel up to 16 rows, band-wise dequantisation above
            x = torch.randn(rows, weight.shape[1], generator=gen)
            got = layer(x)
            assert_within_m_rounding(got, x, weight, zs)
            if FORMATS[name].get("sym"):  # m = -8 * scale is exact in fp16: nothing but summation order
                torch.testing.assert_close(got, x @ weight.T, rtol=1e-5, atol=1e-5 * (x @ weight.T).abs().max().item())
    if act_order:  # the features of layers with more than one group are stored sorted by group
        assert layers["model.layers.0.mlp.down_proj"].input_perm is not None
    assert model.lm_head.qweight is None and model.lm_head.weight is not None  # the head stays float


def test_act_order_projections_with_different_orders_in_one_packed_layer_load_dequantised(float_dir, tmp_path, caplog):
    """q, k and v each with its own act-order: one input permutation cannot serve them all, so qkv_proj
    (and gate_up_proj) are dequantised, with a warning, and still compute the reference."""
    path = write_quantized_checkpoint(float_dir, tmp_path / "q", group_size=32, desc_act=True, shared_order=False)
    with caplog.at_level(logging.WARNING, logger="loom.runtime.models.gptq_awq"):
        model, _ = load_model(path, torch.float32, quantization="auto")
    assert "qkv_proj: its input features" in caplog.text
    ref = reference(path)
    for module, layer in linear_layers(model).items():
        packed = module.endswith(("qkv_proj", "gate_up_proj"))
        assert (layer.qtype is None) == packed, module
        weight, zs = reference_layer(ref, module)
        x = torch.randn(4, weight.shape[1])
        assert_within_m_rounding(layer(x), x, weight, zs)


def test_none_dequantises_to_the_reference_exactly(checkpoints):
    path = checkpoints("gptq-g128-act-order")
    model, _ = load_model(path, torch.float32, quantization="none")
    ref = reference(path)
    for module, layer in linear_layers(model).items():
        assert layer.qweight is None and torch.equal(layer.weight, reference_layer(ref, module)[0]), module


@pytest.mark.parametrize("name", ["gptq-g128-act-order", "awq-g64"])
def test_the_engine_on_the_quantized_checkpoint_gives_the_float_checkpoints_tokens(checkpoints, tmp_path, name):
    """Same greedy tokens as a float checkpoint holding the dequantised weights."""
    quantized = checkpoints(name)
    dequantised = write_dequantized(quantized, tmp_path / "float")
    prompts = [[5, 9, 33, 17], [40, 2, 8, 8, 100, 7, 61]]
    params = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
    runs = {}
    for label, path, mode in (("quantized", quantized, "auto"), ("float", dequantised, "none")):
        with LocalEngine(model_path=str(path), quantization=mode, dtype="float32", max_total_tokens=512) as engine:
            runs[label] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
    assert runs["quantized"] == runs["float"]
    assert len(runs["float"][0]) == 8


@pytest.mark.parametrize("name", ["gptq-g64-sym", "gptq-g128-act-order", "awq-g32"])
def test_tensor_parallel_ranks_hold_their_shards(checkpoints, tmp_path, caplog, name):
    """With tp_size=2 each rank's layer computes what the float checkpoint's shard computes. Column-parallel
    shards are whole output rows; row-parallel ones cut the input features at whole groups. With act-order
    a rank's half of the input features spreads over every group, in runs that are not whole blocks: those
    layers (o_proj, down_proj) are dequantised on each rank, with a warning."""
    path = checkpoints(name)
    dequantised = write_dequantized(path, tmp_path / "float")
    zs_max = max(float(np.abs(zs).max()) for _, zs in reference(path).values())
    g_idx = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if k.endswith(".g_idx")}
    gen = torch.Generator().manual_seed(1)
    fell_back = 0
    for rank in range(2):
        with caplog.at_level(logging.WARNING, logger="loom.runtime.models.gptq_awq"):
            caplog.clear()
            shard, _ = load_model(path, torch.float32, tp_rank=rank, tp_size=2, quantization="auto")
        floats = linear_layers(load_model(dequantised, torch.float32, tp_rank=rank, tp_size=2)[0])
        for module, layer in linear_layers(shard).items():
            weight = floats[module].weight
            whole_blocks = True
            if module.endswith(("o_proj", "down_proj")) and f"{module}.g_idx" in g_idx:  # row-parallel: half the inputs
                local = g_idx[f"{module}.g_idx"][rank * weight.shape[1] : (rank + 1) * weight.shape[1]]
                whole_blocks = bool((np.bincount(local) % 32 == 0).all())
            assert (layer.qtype == "Q4_1") == whole_blocks, module
            fell_back += not whole_blocks
            x = torch.randn(5, weight.shape[1], generator=gen)
            want = x @ weight.T
            got = layer.matmul(x, None)  # this rank's part, before any all-reduce
            bound = x.abs().sum(-1, keepdim=True) * zs_max * 2.0**-11 + 1e-5 * want.abs().max()
            assert ((got - want).abs() <= bound).all(), module
        assert ("dequantised into" in caplog.text) == (fell_back > 0)
    assert (fell_back > 0) == FORMATS[name].get("desc_act", False)  # act-order's down_proj halves mix groups here


def test_autogptqs_own_quantize_config_json_is_read(checkpoints, tmp_path):
    """Older AutoGPTQ folders keep the settings in quantize_config.json (no quant_method), as vLLM reads them."""
    path = shutil.copytree(checkpoints("gptq-g64-sym"), tmp_path / "legacy")
    config = json.loads((path / "config.json").read_text())
    quant = config.pop("quantization_config")
    del quant["quant_method"]
    (path / "config.json").write_text(json.dumps(config))
    (path / "quantize_config.json").write_text(json.dumps(quant))
    model, _ = load_model(path, torch.float32, quantization="auto")
    assert {m.qtype for m in linear_layers(model).values()} == {"Q4_1"}


def test_which_devices_keep_the_layers_quantized():
    """auto keeps them where Q4_1 has a kernel (the CPU; CUDA with Triton); none and other devices dequantise."""
    scheme = parse_quant_config({"quant_method": "gptq", "bits": 4, "group_size": 128}, "config.json")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert keeps_quantized(scheme, "auto", cpu) and not keeps_quantized(scheme, "none", cpu)
    assert not keeps_quantized(None, "auto", cpu)  # a float checkpoint
    assert keeps_quantized(scheme, "auto", cuda) == runs_on(cuda) and not keeps_quantized(scheme, "auto", torch.device("mps"))


# ----------------------------------------------------------------------------- what Loom refuses


def _variant(src: pathlib.Path, dst: pathlib.Path, **quant) -> pathlib.Path:
    """A copy of `src` whose quantization_config has `quant`'s keys (None: the key removed)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] |= quant
    config["quantization_config"] = {k: v for k, v in config["quantization_config"].items() if v is not None}
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("quant, message", [
    ({"bits": 8}, r"bits=8 is not supported; Loom reads 4-bit GPTQ"),
    ({"bits": 3}, r"bits=3"),
    ({"group_size": 48}, r"group_size=48 is not supported.*multiple of 32"),
    ({"group_size": 16}, r"group_size=16"),
    ({"group_size": 96}, r"group_size=96 does not divide model\.layers\.0\.mlp\.down_proj's 256 input features"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not supported.*gptq or gptq_v2"),
    ({"quant_method": "fp8"}, r"quant_method='fp8' is not supported; Loom reads gptq and awq"),
    ({"dynamic": {"-:.*down_proj": {}}}, r"dynamic"),
])  # fmt: skip
def test_a_gptq_config_loom_cannot_run_is_refused_by_name(checkpoints, tmp_path, quant, message):
    path = _variant(checkpoints("gptq-g32"), tmp_path / "bad", **quant)
    with pytest.raises(QuantizedCheckpointError, match=message):
        load_model(path, torch.float32, quantization="auto")


@pytest.mark.parametrize("quant, message", [
    ({"version": "gemv"}, r"version='gemv' is not supported; Loom reads AWQ version 'gemm'"),
    ({"zero_point": False}, r"zero_point=False"),
    ({"w_bit": 4, "bits": None}, None),  # AutoAWQ's own key names are read too
])  # fmt: skip
def test_awq_settings(checkpoints, tmp_path, quant, message):
    path = _variant(checkpoints("awq-g32"), tmp_path / "awq", **quant)
    if message is None:
        assert load_model(path, torch.float32, quantization="auto")[0].model.layers[0].mlp.down_proj.qtype == "Q4_1"
        return
    with pytest.raises(QuantizedCheckpointError, match=message):
        load_model(path, torch.float32, quantization="auto")


def test_missing_tensors_and_int8_on_a_gptq_checkpoint_are_refused(float_dir, checkpoints, tmp_path):
    no_scales = write_quantized_checkpoint(float_dir, tmp_path / "a", group_size=32, drop=("model.layers.1.mlp.up_proj.scales",))
    with pytest.raises(QuantizedCheckpointError, match=r"model.layers.1.mlp.up_proj has no scales"):
        load_model(no_scales, torch.float32, quantization="none")
    no_g_idx = write_quantized_checkpoint(float_dir, tmp_path / "b", group_size=32, desc_act=True,
                                          drop=("model.layers.0.self_attn.k_proj.g_idx",))  # fmt: skip
    with pytest.raises(QuantizedCheckpointError, match=r"k_proj has no g_idx"):
        load_model(no_g_idx, torch.float32, quantization="auto")
    for mode in ("int8", "int4"):
        with pytest.raises(QuantizedCheckpointError, match=rf"quantization='{mode}' .* already GPTQ 4-bit: use 'auto'"):
            load_model(checkpoints("gptq-g32"), torch.float32, quantization=mode)
