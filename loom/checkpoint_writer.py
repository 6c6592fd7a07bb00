"""Checkpoint writing: a random-weight model in the Hugging Face layout, with its tokenizer.

A folder written here looks like one downloaded from the hub: `config.json`,
`generation_config.json`, `model.safetensors` (or `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` (with a ChatML
`chat_template`) and `special_tokens_map.json`. Loom and Transformers both load it through
their ordinary paths, so tests can compare the two on the same weights.

Weights are random but larger than Hugging Face's default (std 0.02), so the logits are
peaky: greedy tokens rarely hinge on a near-tie that float noise could flip. The tokenizer is
`loom/tiny_tokenizer.py`'s.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import TYPE_CHECKING, Any

from loom.tiny_tokenizer import ENDOFTEXT, IM_END, IM_START, SPECIAL_TOKENS, tiny_tokenizer

if TYPE_CHECKING:
    import torch

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Linear and embedding weights get std INIT_GAIN / sqrt(hidden_size): the final-norm output
# has entries of size ~1, so a logit's std is ~INIT_GAIN (times the norm weight).
INIT_GAIN = 3.0
BIAS_STD = 0.5
NORM_JITTER = 0.1


def write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` as every JSON file here is written: indent 2, sorted keys, UTF-8 kept, a final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, path: pathlib.Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    path.joinpath("tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for tok in SPECIAL_TOKENS
    }  # fmt: skip
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "unk_token": None}
    config = {
        **special,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    write_json(path / "tokenizer_config.json", config)
    special_map = {k: v for k, v in special.items() if v is not None}
    write_json(path / "special_tokens_map.json", {**special_map, "additional_special_tokens": [IM_START, IM_END]})


def _hf_config(arch: str, *, head_dim: int, rope_theta: float, **shape: Any) -> Any:
    """The Transformers config object for `arch` (eos/bos/pad = `<|endoftext|>`, id 0)."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
    # Full attention everywhere: no sliding window, as in Mistral v0.2+ and Qwen's defaults.
    extra: dict[str, Any] = {"sliding_window": None} if arch == "mistral" else {}
    if arch in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = False
    config = getattr(transformers, classes[arch])(
        head_dim=head_dim, rope_theta=rope_theta, bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape, **extra
    )
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def _random_state_dict(config: Any, seed: int, init_std: float) -> dict[str, torch.Tensor]:
    """Float32 weights for `config`'s *ForCausalLM, drawn from one seeded generator in name order.

    Matrices ~ N(0, init_std); norm weights (incl. Qwen3's q_norm/k_norm) ~ 1 + N(0, 0.1), so a
    loader that skips them is caught; biases (Qwen2's q/k/v) ~ N(0, 0.5). A tied lm_head is left
    out, as `save_pretrained` does.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # names and shapes only: no memory, no Transformers init, no global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith(".bias"):
            state[name] = noise * BIAS_STD
        elif param.ndim == 1:
            state[name] = 1.0 + NORM_JITTER * noise
        else:
            state[name] = noise * init_std
    if not config.tie_word_embeddings:
        assert "lm_head.weight" in state, "an untied model must have its own lm_head"
    return state


def _save_weights(state: dict[str, torch.Tensor], path: pathlib.Path, num_shards: int) -> None:
    """model.safetensors, or num_shards contiguous shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
        return
    names = list(state)
    assert 1 < num_shards <= len(names), f"cannot split {len(names)} tensors into {num_shards} shards"
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[]]
    filled = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        left_tensors, left_shards = len(names) - i, num_shards - len(shards)
        full = filled >= total * len(shards) / num_shards
        if shards[-1] and left_shards and (full or left_tensors == left_shards):
            shards.append([])
        shards[-1].append(name)
        filled += size
    assert len(shards) == num_shards and all(shards), f"sharding produced {[len(s) for s in shards]}"
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: state[n] for n in shard}, str(path / filename), metadata=meta)
        weight_map.update(dict.fromkeys(shard, filename))
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in state.values()), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    write_json(path / "model.safetensors.index.json", index)


def build_tiny_checkpoint(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    init_std: float | None = None,
    tokenizer_vocab_size: int | None = None,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
) -> pathlib.Path:
    """Write a random-weight `arch` checkpoint with its tokenizer into `path`; return the path.

    Deterministic in all arguments. `init_std` defaults to `INIT_GAIN / sqrt(hidden_size)`.
    The tokenizer has `tokenizer_vocab_size or vocab_size` tokens at most (fewer when the corpus
    runs out of merges), never more than the model's `vocab_size`. Files already in `path` with
    the same names are overwritten.

    Raises:
        ValueError: unknown `arch` or `dtype`, heads that do not divide, too many shards, or a
            tokenizer vocabulary larger than the model's or smaller than 259.
    """
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not a multiple of num_key_value_heads={num_key_value_heads}"
        )
    if head_dim is None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; pass head_dim"
            )
        head_dim = hidden_size // num_attention_heads
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    tok_vocab = tokenizer_vocab_size or vocab_size
    if tok_vocab > vocab_size:
        raise ValueError(f"tokenizer_vocab_size={tok_vocab} exceeds the model's vocab_size={vocab_size}")
    init_std = INIT_GAIN / math.sqrt(hidden_size) if init_std is None else init_std

    config = _hf_config(
        arch, head_dim=head_dim, rope_theta=rope_theta, vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps, initializer_range=init_std,
    )  # fmt: skip
    state = _random_state_dict(config, seed, init_std)
    if num_shards > len(state):
        raise ValueError(f"num_shards={num_shards} exceeds the model's {len(state)} tensors")
    torch_dtype = getattr(torch, dtype)
    state = {name: t.to(torch_dtype).contiguous() for name, t in state.items()}
    tokenizer = tiny_tokenizer(tok_vocab)

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, out, max_position_embeddings)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    _save_weights(state, out, num_shards)
    # Older readers look for the top-level "rope_theta" / "torch_dtype" keys; Transformers 5
    # writes "rope_parameters" / "dtype" and accepts both, as hub checkpoints carry either.
    config_dict = {**config.to_diff_dict(), "dtype": dtype, "rope_theta": rope_theta, "torch_dtype": dtype}
    write_json(out / "config.json", config_dict)

    from transformers import GenerationConfig, __version__

    # Chat models stop at <|im_end|> too, as Qwen's instruct checkpoints say in this file.
    generation = GenerationConfig(bos_token_id=0, eos_token_id=[0, tokenizer.token_to_id(IM_END)], pad_token_id=0)
    write_json(out / "generation_config.json", {**generation.to_diff_dict(), "transformers_version": __version__})
    return out
