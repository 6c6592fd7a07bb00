"""Apply a packed int32 token bitmask to logits in place: a cleared bit sets that token's logit to -inf.

Layout (as xgrammar's): row `b` of `bitmask` is [ceil(V / 32)] int32; token `t` is allowed when bit
`t % 32` of word `t // 32` is set. Tokens past the mask's last word are disallowed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def apply_token_bitmask_inplace_torch(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Reference. logits: [B, V] float; bitmask: [B, W] int32."""
    v = logits.shape[-1]
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask[..., None] >> bits) & 1).bool().flatten(-2)  # [B, W * 32]
    if allowed.shape[-1] < v:
        allowed = torch.nn.functional.pad(allowed, (0, v - allowed.shape[-1]), value=False)
    logits.masked_fill_(~allowed[..., :v], float("-inf"))


@triton.jit
def _apply_bitmask_kernel(
    logits_ptr, bitmask_ptr, stride_l, stride_m, vocab, num_words, BLOCK: tl.constexpr
):  # fmt: skip
    b = tl.program_id(0)
    tok = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    word = tok // 32
    words = tl.load(bitmask_ptr + b * stride_m + word, mask=(tok < vocab) & (word < num_words), other=0)
    allowed = ((words >> (tok % 32)) & 1) != 0
    tl.store(logits_ptr + b * stride_l + tok, float("-inf"), mask=(tok < vocab) & ~allowed)


def apply_token_bitmask_inplace(logits: torch.Tensor, bitmask: torch.Tensor, block: int = 1024) -> None:
    """logits: [B, V] float, last dim contiguous; bitmask: [B, W] int32 (same device)."""
    assert logits.dim() == 2 and bitmask.dim() == 2 and logits.shape[0] == bitmask.shape[0], (
        f"logits {tuple(logits.shape)} and bitmask {tuple(bitmask.shape)} must be [B, V] and [B, W]"
    )
    assert bitmask.dtype == torch.int32 and logits.stride(-1) == 1 and bitmask.stride(-1) == 1
    b, v = logits.shape
    if b == 0:
        return
    _apply_bitmask_kernel[(b, triton.cdiv(v, block))](
        logits, bitmask, logits.stride(0), bitmask.stride(0), v, bitmask.shape[1], BLOCK=block
    )
