"""Attention backend on Triton kernels: paged decode (split along the sequence, GQA) and extend
with a cached prefix, both reading K/V from the token-indexed pool through `req_to_token`.

`init_forward_metadata` builds the per-step index tensors once; every layer reuses them. The
step's k/v are stored into the pool by the `store_kv` kernel before attending.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

from loom.kernels.attention.base import AttentionBackend, AttentionLayer, ForwardBatchLike
from loom.kernels.triton import INTERPRETED, decode_attention, extend_attention, num_kv_splits_for, store_kv


@dataclass(slots=True)
class TritonDecodeMetadata:
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] tokens with KV, this step's included
    num_kv_splits: int


@dataclass(slots=True)
class TritonExtendMetadata:
    req_pool_indices: torch.Tensor  # [B]
    qo_start: torch.Tensor  # [B] first row of each request's new tokens in q
    prefix_lens: torch.Tensor  # [B]
    extend_lens: torch.Tensor  # [B]
    max_extend_len: int


class TritonAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device | str = "cuda") -> None:
        self.device = torch.device(device)
        self.decode_metadata: TritonDecodeMetadata | None = None
        self.extend_metadata: TritonExtendMetadata | None = None

    def init_forward_metadata(self, batch: ForwardBatchLike) -> None:
        req_pool_indices = batch.req_pool_indices.to(self.device)
        if batch.is_decode:
            splits = num_kv_splits_for(max(batch.seq_lens_cpu, default=1))
            self.decode_metadata = TritonDecodeMetadata(req_pool_indices, batch.seq_lens.to(self.device), splits)
            return
        new = batch.extend_seq_lens_cpu
        starts = [0, *accumulate(new)][: len(new)]
        self.extend_metadata = TritonExtendMetadata(
            req_pool_indices,
            self._tensor(starts),
            self._tensor(batch.extend_prefix_lens_cpu),
            self._tensor(new),
            max(new, default=0),
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)

    @staticmethod
    def _store(
        k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k_buf, v_buf = batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)  # [slots, Hkv, D]
        if INTERPRETED and k_buf.dtype == torch.bfloat16:
            # Silently wrong otherwise: the interpreter computes bf16 tl.dot incorrectly.
            raise ValueError("the triton backend under Triton's interpreter supports float32 and float16, not "
                             "bfloat16; use dtype='float32' or attention_backend='torch_native'")  # fmt: skip
        store_kv(k_buf, v_buf, batch.out_cache_loc, k, v)
        return k_buf, v_buf

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> o: [T, H, D]."""
        meta = self.extend_metadata
        assert meta is not None, "init_forward_metadata must run before forward_extend"
        k_buf, v_buf = self._store(k, v, layer, batch)
        if q.dtype != k_buf.dtype:
            q = q.to(k_buf.dtype)
        return extend_attention(
            q, k_buf, v_buf, batch.req_to_token_pool.req_to_token, meta.req_pool_indices, meta.qo_start,
            meta.prefix_lens, meta.extend_lens, meta.max_extend_len, layer.scaling,
        )  # fmt: skip

    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> torch.Tensor:
        """q: [B, H, D], k/v: [B, Hkv, D] (one new token per request) -> o: [B, H, D]."""
        meta = self.decode_metadata
        assert meta is not None, "init_forward_metadata must run before forward_decode"
        k_buf, v_buf = self._store(k, v, layer, batch)
        if q.dtype != k_buf.dtype:
            q = q.to(k_buf.dtype)
        return decode_attention(
            q, k_buf, v_buf, batch.req_to_token_pool.req_to_token, meta.req_pool_indices, meta.seq_lens,
            layer.scaling, meta.num_kv_splits,
        )  # fmt: skip
