"""GGUF model files: Loom reads config, tokenizer, chat template and weights from one `.gguf`, and
gets what Transformers gets from the same file (`from_pretrained(dir, gguf_file=...)`).

The files are written with the `gguf` package (tests/support/gguf_files.py): tiny Llama / Qwen2 / Qwen3 models with random
weights in every tensor type Loom reads (quantised with `gguf.quants.quantize` where it can; the
K-quants as random valid blocks), the repo's tiny byte-level BPE tokenizer plus a control and a
user-defined token, and a ChatML chat template.
"""

from __future__ import annotations

import pathlib
import random

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.models.gguf_file import SUPPORTED_TYPES, GGUFError, find_gguf_file, read_gguf
from loom.runtime.models.gguf_loader import gguf_config, iter_gguf_weights
from loom.runtime.models.gguf_tokenizer import gguf_tokenizer
from loom.runtime.models.loader import load_config, load_model
from loom.runtime.server_args import ServerArgs
from loom.runtime.tokenizer import load_tokenizer

from gguf_files import CHAT_TEMPLATE, EXTRA_TOKENS, SHAPES, TYPES, tokenizer_parts, write_gguf

# ----------------------------------------------------------------------------- Transformers' side

_HF: dict[pathlib.Path, torch.nn.Module] = {}


def hf_model(path: pathlib.Path) -> torch.nn.Module:
    if path not in _HF:
        _HF[path] = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return _HF[path]


@torch.inference_mode()
def hf_greedy(path: pathlib.Path, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(hf_model(path)(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_param(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Transformers' tensor for Loom's parameter `name` (q/k/v and gate/up are packed in Loom)."""
    packed = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for fused, parts in packed.items():
        if f".{fused}." in name:
            return torch.cat([state[name.replace(fused, part)] for part in parts])
    return state[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    """One file per architecture, its matrices in all the types in turn. Qwen's split text with the
    qwen2 pre-tokenizer; Qwen3's embedding is tied to its LM head (no output.weight), as SmolLM2's is."""
    root = tmp_path_factory.mktemp("gguf")
    return {arch: write_gguf(root / arch / "model.gguf", arch, seed=i, tie=arch == "qwen3", pre="smollm" if arch == "llama" else "qwen2")
            for i, arch in enumerate(SHAPES)}  # fmt: skip


# ----------------------------------------------------------------------------- config, tokenizer


@pytest.mark.parametrize("arch", list(SHAPES))
def test_config_is_transformers_config(files, arch):
    path = files[arch]
    ours, theirs = load_config(path), AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(theirs)
    differ = {k for k in ours.to_dict().keys() | theirs.to_dict().keys() if ours.to_dict().get(k) != theirs.to_dict().get(k)}
    assert differ == {"architectures", "_name_or_path"}
    assert ours.architectures == [type(ours).__name__.replace("Config", "ForCausalLM")]
    assert ours.tie_word_embeddings is (arch == "qwen3") and ours.vocab_size == len(tokenizer_parts()[0])


TEXTS = ["Hello there! How are you today?", "  two spaces\n\nand\ttabs", "<|im_start|>user\nhi<|im_end|>\n",
         "naïve café 日本語 🙂", "<think>step</think> <|tool|>call", "def f(a, b):\n    return a + b  # 12345"]  # fmt: skip
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And <think> 3+3?"}]  # fmt: skip


@pytest.mark.parametrize("how", ["built", "cached"])
@pytest.mark.parametrize("arch", list(SHAPES))
def test_tokenizer_is_transformers_tokenizer(files, arch, how, tmp_path, monkeypatch):
    """Built from the file, and as every engine process loads it after the first: read back from
    the Loom cache folder, where the first load saved it."""
    path = files[arch]
    if how == "built":
        file = read_gguf(path)
        ours = gguf_tokenizer(file, gguf_config(file))
    else:
        monkeypatch.setenv("LOOM_CACHE", str(tmp_path))
        load_tokenizer(ServerArgs(model_path=str(path)))
        assert len(list((tmp_path / "gguf-tokenizers").glob("*.json"))) == 1
        ours = load_tokenizer(ServerArgs(model_path=str(path)))
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert type(ours) is type(theirs)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == theirs.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == theirs.decode(ids) == text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    rendered = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered == theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_end|>\n<|im_start|>assistant\n") and ours.chat_template == CHAT_TEMPLATE
    assert ours.apply_chat_template(MESSAGES, add_generation_prompt=True) == theirs.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == (theirs.bos_token, theirs.eos_token, theirs.pad_token)
    assert (ours.bos_token, ours.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert ours.all_special_ids == theirs.all_special_ids and ours.get_vocab() == theirs.get_vocab()
    # The control and the user-defined token stay whole, as in llama.cpp.
    tool, think = (ours.convert_tokens_to_ids(t) for t, _ in EXTRA_TOKENS)
    assert tool in ours.encode("a<|tool|>b") and think in ours.encode("a<think>b")
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()


def test_sentencepiece_tokenizer_is_transformers_tokenizer(tmp_path):
    """A sentencepiece vocabulary (tokenizer.ggml.model "llama": scores and byte tokens, no merges), as
    Llama 2 and Mistral files have: Transformers rebuilds the merges from the scores and adds BOS."""
    pieces = ["▁", "e", "t", "h", "l", "o", "▁t", "he", "▁the", "ll", "llo", "▁he", "▁hello", "w", "r", "d", "▁w",
              "or", "▁wor", "ld", "▁world"]  # fmt: skip
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {"block_count": 1, "embedding_length": 64, "feed_forward_length": 128, "attention.head_count": 2}.items():
        w.add_key_value(f"llama.{key}", value, gguf.GGUFValueType.UINT32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    file = read_gguf(path)
    ours, theirs = gguf_tokenizer(file, gguf_config(file)), AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in ["hello world", " the world", "hello\nworld é", "</s>the"]:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text))
    assert ours.encode("hello world") == [1, tokens.index("▁hello"), tokens.index("▁world")]
    assert ours.apply_chat_template(MESSAGES, tokenize=False) == theirs.apply_chat_template(MESSAGES, tokenize=False)
    assert ours.backend_tokenizer.to_str() == theirs.backend_tokenizer.to_str()


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_weights_equal_transformers(tmp_path, qtype):
    """Every parameter, dequantised (and Llama's q/k rows unpermuted), equals Transformers' from the same file."""
    path = write_gguf(tmp_path / "model.gguf", "llama", [qtype], layers=1, seed=3)
    model, _ = load_model(path, torch.float32)
    state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    for name, param in model.named_parameters():
        assert torch.equal(param, hf_param(state, name)), name
    assert read_gguf(path).tensors["blk.0.attn_q.weight"].type_name == qtype.name


def test_weights_in_bfloat16_equal_transformers(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", "qwen3", [Q.Q4_K, Q.F16, Q.Q8_0], layers=1, seed=4)
    model, _ = load_model(path, torch.bfloat16)
    state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.bfloat16).state_dict()
    for name, param in model.named_parameters():
        assert param.dtype == torch.bfloat16 and torch.equal(param, hf_param(state, name)), name


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_shard_reads_equal_slices_of_the_full_tensor(tmp_path, qtype):
    """A tensor-parallel rank's rows (and the row-parallel columns) equal that slice of the whole tensor."""
    path = write_gguf(tmp_path / "model.gguf", "llama", [qtype], layers=1, seed=5)
    weights = dict(iter_gguf_weights(read_gguf(path)))
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"):  # fmt: skip
        w = weights[name]
        full = w.full()
        rows, cols = w.get_shape()
        assert tuple(full.shape) == (rows, cols)
        for start, size in ((0, rows // 2), (rows // 2, rows // 2), (rows // 4, rows // 4), (3, 5)):
            assert torch.equal(w[start : start + size, :], full[start : start + size]), (name, start)
        for start, size in ((0, cols // 2), (cols // 2, cols // 2), (7, 40)):
            assert torch.equal(w[:, start : start + size], full[:, start : start + size]), (name, start)


def test_a_rank_dequantises_only_its_rows(tmp_path, monkeypatch):
    """With tp_size=2 each rank's parameters are its slices of the whole model's, and it dequantises
    about half the file: every sharded tensor but o_proj, whose 128-column halves cut its 256-value blocks."""
    path = write_gguf(tmp_path / "model.gguf", "llama", [Q.Q4_K], layers=1, seed=6)
    whole = dict(load_model(path, torch.float32)[0].named_parameters())
    quantised = sum(info.nbytes for info in read_gguf(path).tensors.values() if info.type_name == "Q4_K")
    seen: list[int] = []
    dequantize = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: seen.append(data.size) or dequantize(data, qtype))
    for rank in range(2):
        seen.clear()
        shard = dict(load_model(path, torch.float32, tp_rank=rank, tp_size=2)[0].named_parameters())
        assert 0.45 < sum(seen) / quantised < 0.6
        qkv, full_qkv = shard["model.layers.0.self_attn.qkv_proj.weight"], whole["model.layers.0.self_attn.qkv_proj.weight"]
        q, k = slice(rank * 128, (rank + 1) * 128), slice(256 + rank * 64, 256 + (rank + 1) * 64)
        assert torch.equal(qkv[:128], full_qkv[q]) and torch.equal(qkv[128:192], full_qkv[k])
        down = whole["model.layers.0.mlp.down_proj.weight"][:, rank * 256 : (rank + 1) * 256]
        assert torch.equal(shard["model.layers.0.mlp.down_proj.weight"], down)
        o_proj = whole["model.layers.0.self_attn.o_proj.weight"][:, rank * 128 : (rank + 1) * 128]
        assert torch.equal(shard["model.layers.0.self_attn.o_proj.weight"], o_proj)
        emb = shard["model.embed_tokens.weight"]
        start, real = rank * emb.shape[0], min(emb.shape[0], whole["model.embed_tokens.weight"].shape[0] - rank * emb.shape[0])
        assert torch.equal(emb[:real], whole["model.embed_tokens.weight"][start : start + real])


def test_mistral_file(tmp_path):
    """llama.cpp writes Mistral as "llama"; Transformers' config calls a file Mistral when general.name is
    "mistral", and so does Loom's. (Transformers then cannot load its weights: gguf-py has no "mistral"
    tensor map. The same bytes under another name load as Llama, and Loom's Mistral holds those weights.)"""
    path = write_gguf(tmp_path / "mistral" / "model.gguf", "llama", [Q.Q8_0, Q.Q5_K], layers=1, seed=7, name="mistral")
    config = load_config(path)
    assert type(config).__name__ == "MistralConfig" and config.architectures == ["MistralForCausalLM"]
    blank = {"architectures": None, "_name_or_path": ""}
    assert config.to_dict() | blank == AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict() | blank
    model, _ = load_model(path, torch.float32)
    assert type(model).__name__ == "MistralForCausalLM"
    llama = write_gguf(tmp_path / "llama" / "model.gguf", "llama", [Q.Q8_0, Q.Q5_K], layers=1, seed=7, name="tiny")
    state = AutoModelForCausalLM.from_pretrained(llama.parent, gguf_file=llama.name, dtype=torch.float32).state_dict()
    assert all(torch.equal(param, hf_param(state, name)) for name, param in model.named_parameters())


# ----------------------------------------------------------------------------- the engine


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randint(3, 40))] for _ in range(4)]


@pytest.mark.parametrize("arch", list(SHAPES))
def test_greedy_tokens_equal_transformers(files, arch):
    path = files[arch]
    model_path = path.parent if arch == "qwen2" else path  # a folder holding one .gguf works as well
    prompts = _prompts(len(arch))
    greedy = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
    with LocalEngine(model_path=str(model_path), dtype="float32", quantization="none", max_total_tokens=2048,
                     debug_check_memory=True) as engine:  # fmt: skip
        outs = engine.generate(input_ids=prompts, sampling_params=greedy)
        text = engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        chat = engine.generate(prompt=text, sampling_params=greedy)
    for prompt, out in zip(prompts, outs):
        assert out["output_ids"] == hf_greedy(path, prompt, 10)
    assert len({t for out in outs for t in out["output_ids"]}) > 6  # not one token over and over
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert chat["output_ids"] == hf_greedy(path, reference.encode(text, add_special_tokens=False), 10)


def test_eos_from_the_file_stops_generation(files):
    path = files["llama"]
    with LocalEngine(model_path=str(path), dtype="float32", quantization="none", max_total_tokens=1024) as engine:
        assert 2 in engine.scheduler.eos_token_ids
        out = engine.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 4})
    assert out["output_ids"] == hf_greedy(path, [5, 6, 7], 4)[: len(out["output_ids"])]


# ----------------------------------------------------------------------------- files Loom cannot read


def test_model_path_forms(tmp_path, files):
    assert find_gguf_file(files["llama"]) == files["llama"]
    assert find_gguf_file(files["llama"].parent) == files["llama"]
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.gguf").write_bytes(b"")
    assert find_gguf_file(tmp_path) is None  # a Hugging Face folder keeps its path
    (tmp_path / "config.json").unlink()
    (tmp_path / "b.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match=r"holds 2 \.gguf files \(a\.gguf, b\.gguf\)"):
        load_config(tmp_path)


def _error(path: pathlib.Path) -> str:
    with pytest.raises(ValueError) as info:
        load_model(path, torch.float32)
    assert isinstance(info.value, GGUFError) and str(path) in str(info.value)
    return str(info.value)


def test_wrong_magic(tmp_path, files):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + files["llama"].read_bytes()[4:])
    assert "not a GGUF file (it starts with b'PK\\x03\\x04'" in _error(bad)


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unreadable_version(tmp_path, files, version):
    bad = tmp_path / "model.gguf"
    data = files["llama"].read_bytes()
    bad.write_bytes(data[:4] + version.to_bytes(4, "little") + data[8:])
    assert ("a big-endian file" if version == 0x03000000 else f"version {version}") in _error(bad)


@pytest.mark.parametrize("arch", list(SHAPES))
def test_header_equals_the_gguf_packages_reading(files, arch):
    """Loom reads the header itself (gguf's reader took seconds on a real vocabulary): the same
    metadata and tensor table as gguf.GGUFReader."""
    path = files[arch]
    ours = read_gguf(path)
    reader = gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert {(t.name, t.tensor_type.name, tuple(reversed(t.shape.tolist())), int(t.data_offset), int(t.n_bytes))
            for t in reader.tensors} == {(i.name, i.type_name, i.shape, i.offset, i.nbytes) for i in ours.tensors.values()}  # fmt: skip


@pytest.mark.parametrize("keep", [3, 100_000, -4096])
def test_truncated_file(tmp_path, files, keep):
    data = files["llama"].read_bytes()
    bad = tmp_path / "model.gguf"
    bad.write_bytes(data[:keep])
    message = _error(bad)
    assert ": truncated: " in message
    if keep < 0:
        assert "tensor 'output.weight' needs bytes up to" in message


def test_unknown_architecture(tmp_path):
    bad = write_gguf(tmp_path / "model.gguf", "gpt2", [Q.F16], layers=1)
    assert "architecture 'gpt2' is not supported; supported: llama, qwen2, qwen3" in _error(bad)


def test_unsupported_tensor_type(tmp_path):
    bad = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 66), dtype=np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = _error(bad)
    assert f"tensor 'blk.0.attn_q.weight' has type IQ2_XXS; supported: {', '.join(SUPPORTED_TYPES)}" in message


def test_missing_key(tmp_path):
    bad = write_gguf(tmp_path / "model.gguf", "llama", [Q.F16], layers=1, skip=("llama.block_count",))
    assert "the metadata has no 'llama.block_count'" in _error(bad)


def test_engine_reports_a_bad_file_without_hanging(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00")
    with pytest.raises(GGUFError, match="truncated"):
        LocalEngine(model_path=str(bad))


def test_unknown_tensor_type_id(tmp_path, files):
    """A type id gguf does not know (a newer llama.cpp's) is named with its tensor."""
    data = bytearray(files["llama"].read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at : at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at : type_at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "model.gguf"
    bad.write_bytes(bytes(data))
    assert "tensor 'blk.0.attn_q.weight' has type id 99, which gguf does not know; supported: F32" in _error(bad)
