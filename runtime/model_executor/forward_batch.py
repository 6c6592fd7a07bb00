"""Per-batch metadata that every layer of one forward pass reads.

The scheduler builds a `ForwardBatch` once per step; the attention backend derives its own
metadata from it in `init_forward_metadata`, so layer signatures stay `(positions, hidden)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

import torch


class ForwardMode(Enum):
    EXTEND = auto()  # prefill: new tokens of each request attend to its cached prefix + themselves
    DECODE = auto()  # one new token per request


@dataclass
class ForwardBatch:
    mode: ForwardMode
    batch_size: int
    # input_ids, positions, out_cache_loc: [T], T = total new tokens of the batch (flattened, request-major)
    input_ids: torch.Tensor
    positions: torch.Tensor
    out_cache_loc: torch.Tensor  # int64 KV slot where each new token's K/V is stored
    req_pool_indices: torch.Tensor  # [B] int64 rows of ReqToTokenPool.req_to_token
    seq_lens: torch.Tensor  # [B] int64 tokens with KV after this step (prefix + new)
    seq_lens_cpu: list[int]
    # EXTEND only: cached prefix length and new-token count per request (sum(extend_seq_lens) == T)
    extend_prefix_lens_cpu: list[int] = field(default_factory=list)
    extend_seq_lens_cpu: list[int] = field(default_factory=list)
    # Pools and backend; set by the model runner.
    req_to_token_pool: Any = None
    token_to_kv_pool: Any = None
    attn_backend: Any = None

    @property
    def is_decode(self) -> bool:
        return self.mode is ForwardMode.DECODE
