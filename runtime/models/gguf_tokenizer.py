"""The tokenizer a GGUF file describes, as a Hugging Face fast tokenizer.

A GGUF has no tokenizer.json: its vocabulary, merges, token types, special token ids, BOS/EOS
flags and chat template are metadata under llama.cpp's key names. They are read here from the
`gguf` package's parse (`gguf_file.read_gguf`) into the dict Transformers' own GGUF path builds
(`get_gguf_tokenizer`), turned into a `tokenizers` backend by Transformers' converter
(`convert_gguf_tokenizer`: normaliser, pre-tokeniser, decoder, control and user-defined tokens)
and wrapped in the class `AutoTokenizer` picks for the model type. The result encodes, decodes
and renders the chat template as `AutoTokenizer.from_pretrained(dir, gguf_file=...)` does.
"""

from __future__ import annotations

from typing import Any

from loom.runtime.models.gguf_file import GGUFError, GGUFFile

# tokenizer.<key> -> the name Transformers gives it (transformers' GGUF_TOKENIZER_MAPPING).
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}
_TOKENIZER_CONFIG_KEYS = {"chat_template": "chat_template", "ggml.add_bos_token": "add_bos_token",
                          "ggml.add_eos_token": "add_eos_token"}  # fmt: skip
_SPECIAL_TOKENS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                   "pad_token": "padding_token_id"}  # fmt: skip


def tokenizer_fields(file: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tokenizer dict for the converter, tokenizer config kwargs), as Transformers' `get_gguf_tokenizer`
    makes them from the same metadata.

    Raises:
        GGUFError: no vocabulary, or a special token id outside it.
    """
    meta = file.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError(f"{file.path}: the metadata has no 'tokenizer.ggml.tokens'; Loom reads the tokenizer from the file")
    tokenizer = {name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_KEYS.items() if f"tokenizer.{key}" in meta}
    config = {name: meta[f"tokenizer.{key}"] for key, name in _TOKENIZER_CONFIG_KEYS.items() if f"tokenizer.{key}" in meta}
    kind = tokenizer.get("tokenizer_type")
    if kind == "llama":
        config.setdefault("add_bos_token", True)  # llama.cpp adds BOS to a sentencepiece vocabulary unless told not to
    for name, key in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"{file.path}: 'tokenizer.ggml.{key}' is {token_id}, outside the vocabulary of {len(tokens)} tokens")
        config[name] = tokens[token_id] if token_id is not None else None
    return tokenizer, config


def _converter() -> Any:
    try:  # Transformers >= 5.2 keeps its GGUF code in a package of its own
        from transformers.integrations.gguf import convert_gguf_tokenizer
    except ImportError:
        from transformers.integrations.ggml import convert_gguf_tokenizer
    return convert_gguf_tokenizer


def _tokenizer_class(config: Any) -> type:
    """The class `AutoTokenizer` takes for this config (a GGUF folder has no tokenizer_config.json)."""
    from transformers import TokenizersBackend
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    cls = TOKENIZER_MAPPING.get(type(config), TokenizersBackend)
    # Mistral's own backend needs its tekken/sentencepiece files, which a GGUF does not carry.
    return TokenizersBackend if cls is None or cls.__name__ == "MistralCommonBackend" else cls


def gguf_tokenizer(file: GGUFFile, config: Any) -> Any:
    """The fast tokenizer of `file` (with its chat template), `config` being `gguf_config(file)`.

    Raises:
        GGUFError: no vocabulary, a special token id outside it, or a tokenizer kind Transformers
            cannot build (it names the kinds it can).
    """
    return tokenizer_from_recipe(tokenizer_recipe(file, config))


def tokenizer_recipe(file: GGUFFile, config: Any) -> dict[str, Any]:
    """What `gguf_tokenizer` builds, as JSON-ready data: the `tokenizers` backend (its JSON), the
    class `AutoTokenizer` picks and the keyword arguments it is made with. Saved, it rebuilds the
    same tokenizer without the file (`tokenizer_from_recipe`); Transformers' own save_pretrained
    does not: reloading a Qwen2 tokenizer adds an NFC normaliser the GGUF one lacks."""
    tokenizer_dict, kwargs = tokenizer_fields(file)
    try:
        backend, extra = _converter()(file.architecture, tokenizer_dict)
    except (ValueError, KeyError) as exc:
        raise GGUFError(f"{file.path}: cannot build its tokenizer: {exc}") from exc
    cls = _tokenizer_class(config)
    return {"backend": backend.to_str(), "class": [cls.__module__, cls.__qualname__],
            "kwargs": {"name_or_path": str(file.path), **kwargs, **extra}}  # fmt: skip


def tokenizer_from_recipe(recipe: dict[str, Any]) -> Any:
    import importlib

    from tokenizers import Tokenizer

    module, name = recipe["class"]
    cls = getattr(importlib.import_module(module), name)
    return cls(tokenizer_object=Tokenizer.from_str(recipe["backend"]), **recipe["kwargs"])
