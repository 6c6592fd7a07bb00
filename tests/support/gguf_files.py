"""Tiny GGUF model files written with the `gguf` package, for the tests: Llama / Qwen2 / Qwen3
shapes with random weights in any tensor type Loom reads (quantised with `gguf.quants.quantize`
where it can; the K-quants as random valid blocks), the repo's tiny byte-level BPE tokenizer plus a
control and a user-defined token, and a ChatML chat template."""

from __future__ import annotations

import json
import pathlib

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from loom.runtime.models.gguf_file import SUPPORTED_TYPES
from loom.tiny_tokenizer import tiny_tokenizer

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# arch -> hidden, intermediate, heads, kv heads, head dim. Rows of 256 values fit every block size;
# Qwen3's head_dim is Transformers' default (128): it does not read the file's key_length.
SHAPES = {"llama": (256, 512, 4, 2, 64), "qwen2": (256, 512, 4, 2, 64), "qwen3": (256, 512, 2, 1, 128)}
TYPES = [Q[name] for name in SUPPORTED_TYPES]
EXTRA_TOKENS = [("<|tool|>", 3), ("<think>", 4)]  # a control token and a user-defined one (llama.cpp's token types)


# ----------------------------------------------------------------------------- writing GGUF files


def tokenizer_parts() -> tuple[list[str], list[int], list[str]]:
    model = json.loads(tiny_tokenizer(384).to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    tokens += [t for t, _ in EXTRA_TOKENS]
    types += [k for _, k in EXTRA_TOKENS]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, types, merges


def _random_k_blocks(rng: np.random.Generator, qtype: Q, rows: int, cols: int, std: float) -> np.ndarray:
    """Random valid K-quant blocks (gguf cannot quantise to these) with values centred near 0, of about `std`."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)

    def f16(value: float) -> np.ndarray:
        return np.full((rows, cols // block), value, dtype=np.float16).view(np.uint8).reshape(rows, cols // block, 2)

    if qtype == Q.Q6_K:  # d * int8 scale * (q - 32), q in [0, 64)
        raw[..., 208:210] = f16(std / 1200)
        return raw.reshape(rows, -1)
    # Q4_K / Q5_K: d * scale * q - dmin * min, 6-bit scales and mins packed in bytes 4..15 of a block
    # (ggml's get_scale_min_k4). Equal scales and mins (bytes 8..11 = 4..7, high nibbles of 12..15 = low
    # nibbles) and dmin = d * mean(q) centre the values.
    raw[..., 8:12] = raw[..., 4:8]
    raw[..., 12:16] = (raw[..., 12:16] & 0x0F) * 0x11
    levels = 16 if qtype == Q.Q4_K else 32
    d = std / (37 * levels * 0.29)
    raw[..., 0:2], raw[..., 2:4] = f16(d), f16(d * (levels - 1) / 2)
    return raw.reshape(rows, -1)


def _encode(rng: np.random.Generator, values: np.ndarray, qtype: Q, std: float) -> tuple[np.ndarray, Q | None]:
    if qtype == Q.F32:
        return values.astype(np.float32), None
    if qtype == Q.F16:
        return values.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
        return _random_k_blocks(rng, qtype, *values.shape, std), qtype
    return gguf.quants.quantize(values.astype(np.float32), qtype), qtype


def write_gguf(path: pathlib.Path, arch: str = "llama", types: list[Q] = TYPES, *, layers: int = 2, seed: int = 0,
               tie: bool = False, name: str = "tiny", pre: str = "smollm", skip: tuple[str, ...] = (),
               tensor_type: dict[str, Q] | None = None) -> pathlib.Path:  # fmt: skip
    """A tiny `arch` model; its matrices take the types of `types` in turn (`tensor_type` pins some).
    `skip` leaves metadata keys out."""
    hidden, inter, heads, kv_heads, head_dim = SHAPES.get(arch, SHAPES["llama"])
    tokens, token_types, merges = tokenizer_parts()
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "general.name": name, f"{arch}.block_count": layers, f"{arch}.context_length": 512,
        f"{arch}.embedding_length": hidden, f"{arch}.feed_forward_length": inter, f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.rope.freq_base": 10000.0,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    if arch == "llama":
        keys |= {"llama.rope.dimension_count": head_dim, "llama.vocab_size": len(tokens)}
    else:
        keys |= {f"{arch}.attention.key_length": head_dim, f"{arch}.attention.value_length": head_dim}
    for key, value in keys.items():
        if key in skip:
            continue
        kind = {str: gguf.GGUFValueType.STRING, bool: gguf.GGUFValueType.BOOL, float: gguf.GGUFValueType.FLOAT32}
        w.add_key_value(key, value, kind.get(type(value), gguf.GGUFValueType.UINT32))
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    std = 3.0 / np.sqrt(hidden)  # peaky logits: greedy tokens do not hinge on float noise
    turn = iter(range(1 << 30))

    def matrix(tensor: str, rows: int, cols: int) -> None:
        qtype = (tensor_type or {}).get(tensor, types[next(turn) % len(types)])
        data, raw = _encode(rng, rng.normal(0, std, size=(rows, cols)), qtype, std)
        w.add_tensor(tensor, data, raw_dtype=raw)

    def vector(tensor: str, n: int, centre: float = 1.0, scale: float = 0.1) -> None:
        w.add_tensor(tensor, (centre + scale * rng.normal(size=n)).astype(np.float32))

    matrix("token_embd.weight", len(tokens), hidden)
    for i in range(layers):
        vector(f"blk.{i}.attn_norm.weight", hidden)
        matrix(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        matrix(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        if arch == "qwen2":
            for proj, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                vector(f"blk.{i}.attn_{proj}.bias", n * head_dim, 0.0, 0.5)
        if arch == "qwen3":
            vector(f"blk.{i}.attn_q_norm.weight", head_dim)
            vector(f"blk.{i}.attn_k_norm.weight", head_dim)
        vector(f"blk.{i}.ffn_norm.weight", hidden)
        matrix(f"blk.{i}.ffn_gate.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_up.weight", inter, hidden)
        matrix(f"blk.{i}.ffn_down.weight", hidden, inter)
    vector("output_norm.weight", hidden)
    if not tie:
        matrix("output.weight", len(tokens), hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
