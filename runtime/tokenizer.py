"""The model's tokenizer, as every process loads it, and what the scheduler takes from it: the EOS
ids and the text hooks for stop strings and jump-forward."""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, GenerationConfig

from loom.runtime.server_args import ServerArgs


def load_tokenizer(args: ServerArgs) -> Any:
    """The Hugging Face tokenizer of `args.tokenizer_path`, else of the model folder."""
    return AutoTokenizer.from_pretrained(args.tokenizer_path or args.model_path)


def eos_token_ids(model_path: str, config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (all that are set)."""
    ids: set[int] = set()
    sources: list[Any] = [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    try:
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
