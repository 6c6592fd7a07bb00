"""The model's tokenizer, as every process loads it, and what the scheduler takes from it: the EOS
ids and the text hooks for stop strings and jump-forward. A GGUF model's tokenizer and chat
template come from the file (`models/gguf_tokenizer.py`).

Transformers (and torch under it, and the model code) are imported when a tokenizer is first
loaded, not with this module: the front imports it before it starts the scheduler, which should not
wait for them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import tempfile
from typing import Any

from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


def load_tokenizer(args: ServerArgs) -> Any:
    """The Hugging Face tokenizer of `args.tokenizer_path`, else of the model: a folder's, or the one
    a GGUF file describes (GGUFError, a ValueError, when Loom cannot read that file)."""
    from transformers import AutoTokenizer

    from loom.runtime.models.gguf_file import find_gguf_file

    path = args.tokenizer_path or args.model_path
    gguf_path = find_gguf_file(path)
    if gguf_path is not None:
        return _gguf_tokenizer_cached(gguf_path)
    return AutoTokenizer.from_pretrained(path)


def _gguf_tokenizer_cached(gguf_path: pathlib.Path) -> Any:
    """A GGUF file's tokenizer, built once and then rebuilt from its recipe in the Loom cache folder.

    Building it (reading the file's vocabulary and merges, converting them) takes 1-2 s for a 49k
    vocabulary, and every engine process (front, scheduler, detokenizer) needs it; the saved recipe
    loads in a fraction of that. The entry is keyed by the file (path, size, modification time) and
    by the versions that build it, so it is never stale."""
    import tokenizers
    import transformers

    import loom
    from loom.cache_dir import cache_dir
    from loom.runtime.models.gguf_file import read_gguf
    from loom.runtime.models.gguf_loader import gguf_config
    from loom.runtime.models.gguf_tokenizer import tokenizer_from_recipe, tokenizer_recipe

    stat = gguf_path.stat()
    key = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{loom.__version__}|{transformers.__version__}|{tokenizers.__version__}"
    entry = cache_dir() / "gguf-tokenizers" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if entry.is_file():
        try:
            return tokenizer_from_recipe(json.loads(entry.read_text()))
        except (OSError, ValueError, KeyError, TypeError, ImportError, AttributeError) as exc:  # a damaged entry
            logger.warning("cached tokenizer %s unreadable (%s); rebuilding it from %s", entry, exc, gguf_path)
    file = read_gguf(gguf_path)
    recipe = tokenizer_recipe(file, gguf_config(file))
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, staging = tempfile.mkstemp(prefix=".building-", dir=entry.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(recipe, f)
        os.replace(staging, entry)  # atomic: a process reading it sees all of it or none
    except OSError as exc:  # a read-only cache folder costs start-up time, nothing else
        logger.warning("could not cache the tokenizer of %s in %s: %s", gguf_path, entry.parent, exc)
    return tokenizer_from_recipe(recipe)


def eos_token_ids(model_path: str, config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json, config.json and the tokenizer (all that are set); a GGUF
    model has its EOS id in the file, which both the config and the tokenizer carry."""
    from transformers import GenerationConfig

    from loom.runtime.models.gguf_file import find_gguf_file

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
