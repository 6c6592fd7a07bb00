"""The reference the golden tests compare with: Transformers' own model on the same weights (in
fp32 unless a test asks for bf16), run as a plain greedy loop; in bf16, where the order of
summation shows, a teacher-forced step check within a tolerance (`check_steps`); random prompts."""

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


@torch.inference_mode()
def reference_logprobs(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Transformers' log-softmax at every position of `ids` -> [len(ids), V] fp32 (bf16 logits)."""
    logits = hf(torch.tensor([ids])).logits[0]
    assert logits.dtype == torch.bfloat16, "the reference must run in bf16"
    return torch.log_softmax(logits.float(), dim=-1)


def check_steps(ref: torch.Tensor, tokens: list[int], logprobs: list[float] | None, tol: float,
                allowed: list[torch.Tensor] | None = None) -> tuple[int, int]:  # fmt: skip
    """Loom's greedy steps against a reference whose arithmetic differs (bf16), teacher-forced:
    Loom's logprob of each token within `tol` of the reference's; the reference's argmax wherever
    its top-2 margin exceeds 2 * tol (two values each off by at most `tol` cannot swap), else a
    token within that margin of the best (a near tie). `ref`: [steps, V] the reference's
    log-softmax at the positions Loom chose from; `logprobs`: Loom's (None: tokens only);
    `allowed`: per step the token ids a grammar allowed (the argmax is then over those).
    -> (steps decided by a margin, steps)."""
    decided = 0
    for j, tok in enumerate(tokens):
        row = ref[j]
        if allowed is not None:
            masked = torch.full_like(row, float("-inf"))
            masked[allowed[j]] = row[allowed[j]]
            row = masked
        if logprobs is not None:
            lp = logprobs[j]
            assert abs(lp - float(ref[j, tok])) <= tol, f"step {j}: logprob {lp:.4f} vs {float(ref[j, tok]):.4f}"
        top = torch.topk(row, 2)
        margin = float(top.values[0] - top.values[1])
        if margin > 2 * tol:
            decided += 1
            assert tok == int(top.indices[0]), f"step {j}: token {tok}, Transformers' {int(top.indices[0])} by {margin:.3f}"
        else:
            assert float(row[tok]) >= float(top.values[0]) - 2 * tol, f"step {j}: token {tok} is not a near tie"
    return decided, len(tokens)


def random_prompts(seed: int, count: int, lo: int, hi: int, vocab: int = 400, prefix: list[int] | None = None):
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(count)]
