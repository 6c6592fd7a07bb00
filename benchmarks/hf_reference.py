"""Transformers' side of the side-by-side benchmarks: the model and tokenizer of the same model
path Loom runs, a Hugging Face folder or a GGUF file (read by Transformers with `gguf_file=`,
dequantised into `dtype`, as Loom reads it)."""

from __future__ import annotations

import os
from typing import Any

import torch


def _from_pretrained(cls: Any, path: str | os.PathLike, **kwargs: Any) -> Any:
    from loom.runtime.models.gguf_file import find_gguf_file

    gguf = find_gguf_file(path)
    if gguf is not None:
        return cls.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
    return cls.from_pretrained(path, **kwargs)


def hf_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, path, dtype=dtype).eval()


def hf_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, path)
