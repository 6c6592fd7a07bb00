"""The attention-backend interface.

A backend reads and writes K/V in a token-indexed pool (`TokenToKVPool`): the K/V of token `t`
of request `r` lives in slot `req_to_token[req_pool_indices[r], t]`. Backends never import the
runtime; they read the batch through the duck-typed fields listed in `ForwardBatchLike`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class ForwardBatchLike(Protocol):
    batch_size: int
    out_cache_loc: torch.Tensor  # [T]
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B]
    seq_lens_cpu: list[int]
    extend_prefix_lens_cpu: list[int]
    extend_seq_lens_cpu: list[int]
    req_to_token_pool: Any
    token_to_kv_pool: Any

    @property
    def is_decode(self) -> bool: ...


@dataclass(slots=True)
class AttentionLayer:
    """Static description of one attention layer (per tensor-parallel rank)."""

    layer_id: int
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank
    head_dim: int
    scaling: float


class AttentionBackend(ABC):
    @abstractmethod
    def init_forward_metadata(self, batch: ForwardBatchLike) -> None:
        """Called once per forward pass before the first layer runs."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the batch's new tokens -> o: [T, H, D].

        Stores k/v at `batch.out_cache_loc` in the pool before attending.
        """
        if batch.is_decode:
            return self.forward_decode(q, k, v, layer, batch)
        return self.forward_extend(q, k, v, layer, batch)

    @abstractmethod
    def forward_extend(self, q, k, v, layer: AttentionLayer, batch: ForwardBatchLike) -> torch.Tensor: ...

    @abstractmethod
    def forward_decode(self, q, k, v, layer: AttentionLayer, batch: ForwardBatchLike) -> torch.Tensor: ...
