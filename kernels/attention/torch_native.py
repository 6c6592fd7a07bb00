"""Reference attention backend in plain torch (CPU and any device), reading K/V from the pool.

Extend: one `scaled_dot_product_attention` per request over its whole sequence (prefix read
from the pool), causal with the diagonal shifted by the prefix length.
Decode: one query per request. A single request attends its slots directly; a batch gathers a
padded [B, max_len] slot table once per step and masks each row past its length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.kernels.attention.base import AttentionBackend, AttentionLayer, ForwardBatchLike


@dataclass(slots=True)
class ExtendRequest:
    q_start: int
    q_end: int
    kv_indices: torch.Tensor  # [seq_len] pool slots of the request's tokens
    mask: torch.Tensor | None  # [new, seq_len] bool (True = attend); None = plain causal (no prefix)


@dataclass(slots=True)
class DecodeMetadata:
    kv_indices: torch.Tensor  # [L] for one request, [B, max_len] (padded with slot 0) for a batch
    mask: torch.Tensor | None  # [B, 1, 1, max_len] bool, None when every row is full


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extend_metadata: list[ExtendRequest] = []
        self.decode_metadata: DecodeMetadata | None = None

    def init_forward_metadata(self, batch: ForwardBatchLike) -> None:
        """Slot tables and masks for this step, shared by every layer."""
        req_to_token = batch.req_to_token_pool.req_to_token
        rows = batch.req_pool_indices.tolist()
        if batch.is_decode:
            self.decode_metadata = self._decode_metadata(req_to_token, batch, rows)
            return
        self.extend_metadata = []
        q_start = 0
        for row, prefix, new in zip(rows, batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu):
            seq = prefix + new
            mask = None
            if prefix:
                # query j (absolute position prefix + j) sees keys 0 .. prefix + j
                keys = torch.arange(seq, device=req_to_token.device)
                queries = torch.arange(prefix, seq, device=req_to_token.device)
                mask = keys[None, :] <= queries[:, None]
            self.extend_metadata.append(ExtendRequest(q_start, q_start + new, req_to_token[row, :seq], mask))
            q_start += new

    @staticmethod
    def _decode_metadata(req_to_token: torch.Tensor, batch: ForwardBatchLike, rows: list[int]) -> DecodeMetadata:
        lens = batch.seq_lens_cpu
        if len(rows) == 1:
            return DecodeMetadata(req_to_token[rows[0], : lens[0]], None)
        max_len = max(lens)
        indices = req_to_token[batch.req_pool_indices, :max_len]  # [B, max_len]
        if min(lens) == max_len:
            return DecodeMetadata(indices, None)
        seq_lens = batch.seq_lens.to(indices.device)
        valid = torch.arange(max_len, device=indices.device)[None, :] < seq_lens[:, None]  # [B, max_len]
        indices = indices.masked_fill(~valid, 0)  # slot 0 is the pool's reserved padding slot
        return DecodeMetadata(indices, valid[:, None, None, :])

    def forward_extend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] -> o: [T, H, D]."""
        pool = batch.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)  # [slots, Hkv, D]
        o = torch.empty_like(q)
        gqa = layer.num_heads != layer.num_kv_heads
        for req in self.extend_metadata:
            qr = q[req.q_start : req.q_end].transpose(0, 1)  # [H, n, D]
            kr = k_buf.index_select(0, req.kv_indices).transpose(0, 1)  # [Hkv, S, D]
            vr = v_buf.index_select(0, req.kv_indices).transpose(0, 1)
            out = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=req.mask, is_causal=req.mask is None, scale=layer.scaling, enable_gqa=gqa
            )  # [H, n, D]
            o[req.q_start : req.q_end] = out.transpose(0, 1)
        return o

    def forward_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: AttentionLayer, batch: ForwardBatchLike
    ) -> torch.Tensor:
        """q: [B, H, D], k/v: [B, Hkv, D] (one new token per request) -> o: [B, H, D]."""
        pool = batch.token_to_kv_pool
        pool.set_kv_buffer(layer.layer_id, batch.out_cache_loc, k, v)
        k_buf, v_buf = pool.get_kv_buffer(layer.layer_id)
        meta = self.decode_metadata
        assert meta is not None, "init_forward_metadata must run before forward_decode"
        b, h, d = q.shape
        hkv = layer.num_kv_heads
        # Group the query heads by KV head so K/V are never repeated: q [B, Hkv, G, D].
        qg = q.view(b, hkv, h // hkv, d)
        # index_select, not k_buf[indices]: advanced indexing was ~4x slower on the CPU.
        kr = k_buf.index_select(0, meta.kv_indices.view(-1)).view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
        vr = v_buf.index_select(0, meta.kv_indices.view(-1)).view(b, -1, hkv, d).transpose(1, 2)
        mask = meta.mask  # [B, 1, 1, L] broadcast over (Hkv, G)
        out = F.scaled_dot_product_attention(qg, kr, vr, attn_mask=mask, scale=layer.scaling)  # [B, Hkv, G, D]
        return out.reshape(b, h, d)
