"""The tiny checkpoints look like hub checkpoints: Transformers loads them as it would a download."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from loom import demo_model
from loom.checkpoint_writer import build_tiny_checkpoint
from loom.demo_model import demo_model_path, smollm2_135m_shape

UNICODE = "héllo wörld 你好 🙂"


def saved_tensors(path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor in the folder's safetensors files, whether sharded or not."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def load_hf(path: pathlib.Path, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not any(info.values()), f"loading was not clean: {info}"
    return model.eval()


def test_config_names_the_architecture(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    names = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral"}
    assert config.architectures == [f"{names[config.model_type]}ForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (512, 64, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    raw = json.loads((tiny_model_dir / "config.json").read_text())
    assert raw["dtype"] == raw["torch_dtype"] == "float32"
    assert raw["rope_theta"] == config.rope_parameters["rope_theta"] == 10000.0


def test_transformers_loads_the_saved_weights(tiny_model_dir):
    model = load_hf(tiny_model_dir)
    saved = saved_tensors(tiny_model_dir)
    params = dict(model.named_parameters())
    assert set(saved) == set(params)
    for name, tensor in saved.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_weights_are_random_beyond_the_matrices(tiny_model_dir):
    saved = saved_tensors(tiny_model_dir)
    norms = {n: t for n, t in saved.items() if "norm" in n}
    assert norms and all(not torch.all(t == 1) for t in norms.values()), "norm weights should be jittered"
    arch = AutoConfig.from_pretrained(tiny_model_dir).model_type
    if arch == "qwen2":
        biases = [n for n in saved if n.endswith(".bias")]
        assert len(biases) == 3 * 2  # q, k, v in each of 2 layers
        assert all(saved[n].abs().mean() > 0.1 for n in biases)
    if arch == "qwen3":
        assert {"model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"} <= set(norms)


def test_tokenizer_special_tokens_match_the_config(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token_id == tok.pad_token_id == tok.bos_token_id == config.eos_token_id == config.bos_token_id == 0
    assert GenerationConfig.from_pretrained(tiny_model_dir).eos_token_id == [0, 2]
    assert len(tok) == 512 <= config.vocab_size
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids[0] == 1 and ids[-1] == 2 and not {0, 1, 2} & set(ids[1:-1])


def test_tokenizer_round_trips_any_text(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in [UNICODE, "Hello there", "  two  spaces\n\ttab", "\x00\x7f bytes", "a" * 300]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.encode("Hello there") == tok.encode("Hello there", add_special_tokens=False)  # no BOS added
    ids = tok.encode(f"<|im_start|>{UNICODE}<|im_end|>", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == UNICODE


def test_chat_template_renders_chatml(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": UNICODE}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{UNICODE}<|im_end|>\n"
    assert text == expected + "<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    assert "chat_template" in json.loads((tiny_model_dir / "tokenizer_config.json").read_text())


def test_logits_have_a_clear_winner(tiny_model_dir):
    """Greedy golden tests need top-1 to beat top-2 by far more than float noise."""
    model = load_hf(tiny_model_dir)
    gen = torch.Generator().manual_seed(0)
    gaps = []
    with torch.inference_mode():
        for _ in range(8):
            ids = torch.randint(3, 512, (1, int(torch.randint(4, 48, (1,), generator=gen))), generator=gen)
            top2 = model(ids).logits[0].topk(2, dim=-1).values  # [S, 2]
            gaps.append(top2[:, 0] - top2[:, 1])
    gaps_all = torch.cat(gaps)
    assert gaps_all.median() > 0.1, f"median top-1/top-2 gap {gaps_all.median():.4f}"
    assert (gaps_all < 1e-3).float().mean() < 0.02


def test_sharded_checkpoint_has_an_index_and_loads(make_tiny_model):
    path = make_tiny_model("qwen2", num_shards=3)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved_tensors(path).values())
    for name, file in index["weight_map"].items():
        with safe_open(path / file, "pt") as f:
            assert name in f.keys()
    unsharded = saved_tensors(make_tiny_model("qwen2"))
    params = dict(load_hf(path).named_parameters())
    assert all(torch.equal(params[n].detach(), t) for n, t in unsharded.items())


def test_bfloat16_checkpoint(make_tiny_model):
    path = make_tiny_model("qwen3", dtype="bfloat16")
    saved = saved_tensors(path)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert AutoConfig.from_pretrained(path).dtype == torch.bfloat16
    model = load_hf(path, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    fp32 = saved_tensors(make_tiny_model("qwen3"))
    assert all(torch.equal(saved[n], t.to(torch.bfloat16)) for n, t in fp32.items())


def test_tied_embeddings_have_no_lm_head(make_tiny_model):
    path = make_tiny_model("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in saved_tensors(path)
    model = load_hf(path)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, make_tiny_model):
    again = build_tiny_checkpoint(tmp_path, "mistral")
    first = make_tiny_model("mistral")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name
    other = saved_tensors(make_tiny_model("mistral", seed=1))
    assert not torch.equal(other["model.embed_tokens.weight"], saved_tensors(first)["model.embed_tokens.weight"])


def test_tokenizer_can_be_smaller_than_the_model_vocab(make_tiny_model):
    path = make_tiny_model("llama", vocab_size=640, tokenizer_vocab_size=400, init_std=0.5)
    assert len(AutoTokenizer.from_pretrained(path)) == 400
    assert AutoConfig.from_pretrained(path).vocab_size == 640
    assert saved_tensors(path)["model.embed_tokens.weight"].std() == pytest.approx(0.5, rel=0.05)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "gpt2"}, "unknown arch 'gpt2'"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"tokenizer_vocab_size": 1024}, "exceeds the model's vocab_size=512"),
        ({"vocab_size": 200}, "too small"),
        ({"num_attention_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"num_shards": 100}, "num_shards=100 exceeds"),
    ],
)
def test_bad_arguments_say_what_is_wrong(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_tiny_checkpoint(tmp_path, **kwargs)


def test_smollm2_shape(tmp_path):
    path = smollm2_135m_shape(tmp_path, num_hidden_layers=1)  # one layer keeps the test fast
    config = AutoConfig.from_pretrained(path)
    assert config.model_type == "llama" and config.tie_word_embeddings
    assert (config.hidden_size, config.intermediate_size, config.vocab_size) == (576, 1536, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.max_position_embeddings == 8192
    assert len(AutoTokenizer.from_pretrained(path)) <= 49152


def test_demo_model_is_built_once_and_rebuilt_when_incomplete(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
    path = demo_model_path()
    assert path == tmp_path / "demo-model"
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    (path / "tokenizer.json").unlink()
    assert demo_model_path() == path and (path / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".demo-model-build-")]


def test_cli_builds_a_checkpoint(tmp_path, capsys):
    argv = [str(tmp_path / "m"), "--arch", "qwen3", "--num-hidden-layers", "1", "--tie-word-embeddings"]
    assert demo_model.main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert config.model_type == "qwen3" and config.num_hidden_layers == 1 and config.tie_word_embeddings
    assert os.path.isfile(tmp_path / "m" / "special_tokens_map.json")
