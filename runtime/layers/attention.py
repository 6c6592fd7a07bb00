"""The attention module of a decoder layer: hands q/k/v to the batch's attention backend."""

from __future__ import annotations

import torch
from torch import nn

from loom.kernels.attention.base import AttentionLayer
from loom.runtime.model_executor.forward_batch import ForwardBatch


class RadixAttention(nn.Module):
    """Attention over the KV pool; which kernel runs is up to `forward_batch.attn_backend`.

    The backend stores this step's k/v at `forward_batch.out_cache_loc` before attending, so the
    next step (or a request sharing the prefix) finds them in the pool.
    """

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int, scaling: float) -> None:
        super().__init__()
        self.layer = AttentionLayer(layer_id, num_heads, num_kv_heads, head_dim, scaling)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> o: [T, H * D]."""
        o = forward_batch.attn_backend.forward(q, k, v, self.layer, forward_batch)  # [T, H, D]
        return o.reshape(o.shape[0], -1)

    def extra_repr(self) -> str:
        layer = self.layer
        return f"layer_id={layer.layer_id}, heads={layer.num_heads}, kv_heads={layer.num_kv_heads}, head_dim={layer.head_dim}"
