"""The reference the golden tests compare with: Transformers' own model on the same fp32
weights, run as a plain greedy loop; and random prompts."""

from __future__ import annotations

import random

import torch
from transformers import AutoModelForCausalLM

_HF_CACHE: dict[str, torch.nn.Module] = {}


def hf_model(path) -> torch.nn.Module:
    key = str(path)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_CACHE[key]


@torch.inference_mode()
def hf_greedy(path, prompt_ids: list[int], n: int) -> list[int]:
    """The reference: a plain greedy loop over Transformers' full forward (no cache, no tricks)."""
    model = hf_model(path)
    ids = list(prompt_ids)
    for _ in range(n):
        logits = model(torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt_ids) :]


def random_prompts(seed: int, count: int, lo: int, hi: int, vocab: int = 400, prefix: list[int] | None = None):
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]
