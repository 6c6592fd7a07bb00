"""A GGUF file's config and weights, as Transformers reads them.

- The config: the same Transformers config object (LlamaConfig, MistralConfig, Qwen2Config,
  Qwen3Config) that `AutoConfig.from_pretrained(dir, gguf_file=...)` builds from the metadata,
  plus `architectures`, so `get_model_class` and the rest of the engine need no GGUF case.
- The weights: each tensor is a lazy `GGUFWeight` under its Hugging Face name. A rank's weight
  loader indexes it for its shard; only those rows (and, where the quant blocks allow, columns)
  are read from the memory-mapped file and dequantised (`gguf.quants.dequantize`, the function
  Transformers calls), so no more than one tensor is ever materialised at a time.
- llama.cpp stores a Llama's q/k rows interleaved for its rotary layout; the reverse permutation
  is Transformers' (`LlamaTensorProcessor._reverse_permute_weights`), applied to the rows read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from loom.runtime.models.gguf_file import GGUFError, GGUFFile, GGUFTensorInfo

logger = logging.getLogger(__name__)

# GGUF architecture -> the Hugging Face model type (a Mistral file is a "llama" one; see `model_type_of`).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_CLASS_NAMES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}  # fmt: skip

# `{arch}.<key>` -> config field, as transformers.integrations.ggml.GGUF_CONFIG_MAPPING has them.
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_REQUIRED_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                  "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}  # fmt: skip


def model_type_of(file: GGUFFile) -> str:
    """The Hugging Face model type of `file`; GGUFError for an architecture Loom has no model for.

    llama.cpp writes Mistral models as "llama". Transformers calls a file Mistral when its
    `general.name` is exactly "mistral" (it tests membership in the list of name values), and
    Llama otherwise; the same rule here keeps the two configs alike. Both run the same model.
    """
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(
            f"{file.path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)} "
            "(Mistral files are written as llama)"
        )
    if arch == "llama" and file.get("general.name") == "mistral":
        return "mistral"
    return ARCHITECTURES[arch]


def gguf_config(file: GGUFFile) -> Any:
    """The Transformers config for `file`, as `AutoConfig.from_pretrained(dir, gguf_file=...)` has it,
    with `architectures` set.

    One addition: a Qwen3 file's `attention.key_length` sets `head_dim` (Transformers keeps the
    class default, 128, and cannot load a file whose heads are another size); a Qwen2 file's does
    where it differs from hidden_size / num_attention_heads.

    Raises:
        GGUFError: an unsupported architecture, or a required key missing.
    """
    from transformers import AutoConfig

    arch, model_type = file.architecture, model_type_of(file)
    for key in _REQUIRED_KEYS:
        file.require(f"{arch}.{key}")
    fields: dict[str, Any] = {"model_type": model_type}
    for key, field in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in file.metadata:
            fields[field] = file.metadata[f"{arch}.{key}"]
    key_length = file.get(f"{arch}.attention.key_length")
    if arch == "llama" and f"{arch}.rope.dimension_count" in file.metadata:
        fields["head_dim"] = file.metadata[f"{arch}.rope.dimension_count"]
    elif arch == "qwen3" and key_length is not None:
        fields["head_dim"] = key_length
    elif arch == "qwen2" and key_length is not None and key_length * fields["num_attention_heads"] != fields["hidden_size"]:
        fields["head_dim"] = key_length  # Transformers' Qwen2 attention reads `head_dim` when the config has one
    for key, field in _TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{key}" in file.metadata:
            fields[field] = file.metadata[f"tokenizer.ggml.{key}"]
    if "general.name" in file.metadata:
        fields["_model_name_or_path"] = file.metadata["general.name"]  # where Transformers puts it
    if "vocab_size" not in fields:
        tokens = file.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise GGUFError(f"{file.path}: the metadata states no vocabulary size ({arch}.vocab_size or tokenizer.ggml.tokens)")
        fields["vocab_size"] = len(tokens)
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    fields["tie_word_embeddings"] = "output.weight" not in file.tensors
    scaling = sorted(k for k in file.metadata if k.startswith(f"{arch}.rope.scaling."))
    if scaling or "rope_freqs.weight" in file.tensors:
        logger.warning("%s: rope scaling (%s) is not applied, as Transformers does not apply it either",
                       file.path, ", ".join(scaling) or "rope_freqs.weight")  # fmt: skip
    config = AutoConfig.for_model(**fields)
    config.architectures = [_CLASS_NAMES[model_type]]
    config._name_or_path = str(file.path)
    return config


# GGUF tensor name -> Hugging Face name (per-layer names after "blk.N.").
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}  # fmt: skip
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for one the native models have no place for."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"


def _llama_row_order(rows: int, n_head: int) -> np.ndarray:
    """Row i of the Hugging Face q/k weight is row order[i] of llama.cpp's: within each head the
    file interleaves the two rotary halves (Transformers' `_reverse_permute_weights`)."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).swapaxes(1, 2).reshape(-1)


class GGUFWeight:
    """One GGUF tensor, read lazily: `get_shape()` and `[slices]`, like a safetensors slice.

    `weight[rows, cols]` reads only the rows asked for from the memory-mapped file and dequantises
    them; a column range is cut from the quant blocks when it falls on block edges, else from the
    dequantised rows. Values are float32 (F16/BF16 tensors keep their type; the parameter's copy
    casts), equal to Transformers' for the same file.
    """

    def __init__(self, data: np.ndarray, info: GGUFTensorInfo, path: Any, row_order: np.ndarray | None = None) -> None:
        """data: the whole file as uint8; row_order: Hugging Face row i is the file's row_order[i]."""
        import gguf

        if len(info.shape) not in (1, 2):
            raise GGUFError(f"{path}: tensor {info.name!r} has {len(info.shape)} dimensions; Loom reads 1 and 2")
        self.info = info
        self.qtype = gguf.GGMLQuantizationType[info.type_name]
        self.block_size, self.type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        self.cols = info.shape[-1]
        self.rows = info.shape[0] if len(info.shape) == 2 else 1
        if self.cols % self.block_size:
            raise GGUFError(f"{path}: tensor {info.name!r} of type {info.type_name} has rows of {self.cols} values, "
                            f"not a multiple of its block of {self.block_size}")  # fmt: skip
        row_bytes = self.cols // self.block_size * self.type_size
        # [rows, row_bytes] uint8, a view of the mapped file: nothing is read yet.
        self.raw = data[info.offset : info.offset + info.nbytes].reshape(self.rows, row_bytes)
        self.row_order = row_order

    def get_shape(self) -> list[int]:
        return list(self.info.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        index = index + (slice(None),) * (len(self.info.shape) - len(index))
        if len(index) != len(self.info.shape) or not all(isinstance(s, slice) and s.step in (None, 1) for s in index):
            raise IndexError(f"{self.info.name}: only [start:stop] slices are supported, got {index!r}")
        if len(self.info.shape) == 1:
            return self._read(slice(0, 1), index[0])[0]
        return self._read(index[0], index[1])

    def full(self) -> torch.Tensor:
        """The whole tensor (dequantised, rows in Hugging Face order)."""
        return self[tuple(slice(None) for _ in self.info.shape)]

    def _read(self, rows: slice, cols: slice) -> torch.Tensor:
        r0, r1, _ = rows.indices(self.rows)
        c0, c1, _ = cols.indices(self.cols)
        r1, c1 = max(r0, r1), max(c0, c1)
        raw = self.raw[r0:r1] if self.row_order is None else self.raw[self.row_order[r0:r1]]
        if c0 % self.block_size == 0 and c1 % self.block_size == 0:  # whole blocks: decode only those
            b0, b1 = c0 // self.block_size * self.type_size, c1 // self.block_size * self.type_size
            return self._decode(raw[:, b0:b1])
        return self._decode(raw)[:, c0:c1]

    def _decode(self, raw: np.ndarray) -> torch.Tensor:
        # raw: [rows, bytes] uint8 -> [rows, values]
        import gguf

        name = self.info.type_name
        if name == "F32":
            return torch.from_numpy(raw.copy().view(np.float32))
        if name == "F16":
            return torch.from_numpy(raw.copy().view(np.float16))
        if name == "BF16":
            return torch.from_numpy(raw.copy().view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(gguf.quants.dequantize(raw, self.qtype))


def _row_orders(file: GGUFFile) -> dict[str, np.ndarray]:
    """The Llama q/k row orders, by GGUF tensor name (none for other architectures)."""
    if file.architecture != "llama":
        return {}
    heads, kv_heads = file.get("llama.attention.head_count"), file.get("llama.attention.head_count_kv")
    if heads is None or kv_heads is None:  # Transformers leaves the rows as they are then
        return {}
    orders: dict[str, np.ndarray] = {}
    for name, info in file.tensors.items():
        if ".attn_q." in name or ".attn_k." in name:
            n_head = heads if ".attn_q." in name else kv_heads
            if info.shape[0] % (2 * n_head):
                raise GGUFError(f"{file.path}: tensor {name!r} has {info.shape[0]} rows, not a whole number of "
                                f"rotary pairs for {n_head} heads")  # fmt: skip
            orders[name] = _llama_row_order(info.shape[0], n_head)
    return orders


def iter_gguf_weights(file: GGUFFile) -> Iterator[tuple[str, GGUFWeight]]:
    """(Hugging Face name, lazy tensor) for every tensor the native models have a place for. The
    file is mapped while the iteration runs; each tensor reads its bytes only when indexed."""
    data = np.memmap(file.path, dtype=np.uint8, mode="r").view(np.ndarray)  # an ndarray view slices faster
    orders = _row_orders(file)
    for name, info in file.tensors.items():
        target = hf_name(name)
        if target is None:
            logger.info("%s: tensor %r has no place in the model; skipped", file.path, name)
            continue
        yield target, GGUFWeight(data, info, file.path, orders.get(name))
