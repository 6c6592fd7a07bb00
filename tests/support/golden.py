"""The reference the golden tests compare with: Transformers' own model on the same weights (in
fp32 unless a test asks for bf16), run as a plain greedy loop; and random prompts."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

_HF_CACHE: dict[tuple[str, torch.dtype], torch.nn.Module] = {}


def hf_model(path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    key = (str(path), dtype)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return _HF_CACHE[key]


@torch.inference_mode()
def hf_greedy(path, prompt_ids: list[int], n: int, dtype: torch.dtype = torch.float32) -> list[int]:
    """The reference: a plain greedy loop over Transformers' full forward (no cache, no tricks)."""
    model = hf_model(path, dtype)
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def random_prompts(seed: int, count: int, lo: int, hi: int, vocab: int = 400, prefix: list[int] | None = None):
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]
