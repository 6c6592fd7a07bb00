"""The model's tokenizer, as every process loads it, and what the scheduler takes from it: the EOS
ids and the text hooks for stop strings and jump-forward. A GGUF model's tokenizer and chat
template come from the file (`models/gguf_tokenizer.py`)."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, GenerationConfig

from loom.runtime.models.gguf_file import find_gguf_file, read_gguf
from loom.runtime.models.gguf_loader import gguf_config
from loom.runtime.models.gguf_tokenizer import gguf_tokenizer
from loom.runtime.server_args import ServerArgs


def load_tokenizer(args: ServerArgs) -> Any:
    """The Hugging Face tokenizer of `args.tokenizer_path`, else of the model: a folder's, or the one
    a GGUF file describes (GGUFError, a ValueError, when Loom cannot read that file)."""
    path = args.tokenizer_path or args.model_path
    gguf_path = find_gguf_file(path)
    if gguf_path is not None:
        file = read_gguf(gguf_path)
        return gguf_tokenizer(file, gguf_config(file))
    return AutoTokenizer.from_pretrained(path)


def eos_token_ids(model_path: str, config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (all that are set); a GGUF
    model has its EOS id in the file, which both the config and the tokenizer carry."""
    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    try:
        if find_gguf_file(model_path) is None:
            sources.append(GenerationConfig.from_pretrained(model_path).eos_token_id)
    except (OSError, ValueError):
        pass
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


def scheduler_text_hooks(tokenizer: Any, model_path: str, config: Any) -> dict[str, Any]:
    """The Scheduler's text keyword arguments: decode_tail (stop strings), eos_token_ids and
    tokenize (jump-forward), all from the model's tokenizer."""
    return {
        "decode_tail": lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
        "eos_token_ids": eos_token_ids(model_path, config, tokenizer),
        "tokenize": lambda text: tokenizer.encode(text, add_special_tokens=False),
    }
