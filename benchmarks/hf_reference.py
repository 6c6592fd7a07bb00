"""Transformers' side of the side-by-side benchmarks: the model and tokenizer of the same model
path Loom runs, a Hugging Face folder or a GGUF file (read by Transformers with `gguf_file=`,
dequantised into `dtype`, as Loom reads it), by default in the dtype Loom's "auto" picks."""

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


def loom_dtype(path: str | os.PathLike, dtype: str = "auto") -> torch.dtype:
    """The dtype a CPU engine given `dtype` runs `path` in (its "auto": bf16 where the CPU has
    native bf16, else fp32), so Transformers is measured and compared in the same precision."""
    from loom.runtime.model_executor.device import resolve_dtype
    from loom.runtime.models.loader import load_config

    return resolve_dtype(dtype, torch.device("cpu"), load_config(path))


def hf_model(path: str | os.PathLike, dtype: torch.dtype | str = "auto") -> Any:
    """Transformers' model of `path` in `dtype`: a torch dtype, or a Loom dtype name resolved as a
    CPU engine resolves it (`loom_dtype`)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        dtype = loom_dtype(path, dtype)
    return _from_pretrained(AutoModelForCausalLM, path, dtype=dtype).eval()


def hf_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, path)
