"""Reference attention backend in plain torch (CPU and any device), reading K/V from the pool.

Extend: one `scaled_dot_product_attention` per request over its whole sequence (prefix read
from the pool), causal with the diagonal shifted by the prefix length.
Decode: one query per request. A single request attends its slots directly; a batch gathers a
padded [B, max_len] slot table once per step and masks each row past its length. When every
row of a decode batch starts with the same slots (requests sharing a cached prefix, the
few-shot case) that prefix is gathered once and attended by all queries in one matmul
("cascade" attention); each row's own suffix is attended separately and the two parts are
merged exactly through one softmax.

Gathers write into buffers reused across layers and steps: a fresh multi-MB tensor per layer
costs more in page faults than the copy itself on the CPU.
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


# A decode batch uses cascade attention when its rows share at least this many leading slots.
CASCADE_MIN_PREFIX = 32


@dataclass(slots=True)
class DecodeMetadata:
    kv_indices: torch.Tensor  # [L] for one request; [B, S] slots after the shared prefix (padded with slot 0)
    mask: torch.Tensor | None  # [B, 1, 1, S] bool, None when every row is full
    prefix_indices: torch.Tensor | None = None  # [P] slots every row starts with (cascade), else None


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extend_metadata: list[ExtendRequest] = []
        self.decode_metadata: DecodeMetadata | None = None
        self._buffers: dict[str, torch.Tensor] = {}

    def _gather(self, name: str, src: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """src[indices] along dim 0, written into a reusable buffer: [N, Hkv, D]."""
        n = indices.numel()
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < n or buf.shape[1:] != src.shape[1:] or buf.dtype != src.dtype:
            buf = torch.empty((max(n, 1024), *src.shape[1:]), dtype=src.dtype, device=src.device)
            self._buffers[name] = buf
        out = buf[:n]
        torch.index_select(src, 0, indices, out=out)
        return out

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
        max_len, min_len = max(lens), min(lens)
        table = req_to_token[batch.req_pool_indices, :max_len]  # [B, max_len]
        shared = 0
        if min_len > CASCADE_MIN_PREFIX:
            differs = (table[:, :min_len] != table[:1, :min_len]).any(0)  # [min_len]
            shared = int(differs.int().argmax()) if bool(differs.any()) else min_len
        prefix = table[0, :shared] if shared >= CASCADE_MIN_PREFIX else None
        start = shared if prefix is not None else 0
        sub = table[:, start:]  # [B, S]
        if min_len == max_len:
            return DecodeMetadata(sub.contiguous(), None, prefix)
        seq_lens = batch.seq_lens.to(table.device)
        valid = torch.arange(start, max_len, device=table.device)[None, :] < seq_lens[:, None]  # [B, S]
        sub = sub.masked_fill(~valid, 0)  # slot 0 is the pool's reserved padding slot
        return DecodeMetadata(sub, valid[:, None, None, :], prefix)

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
            # 4-D inputs: on the CPU, 3-D ones miss the fused kernel (6x slower for a causal prefill).
            qr = q[req.q_start : req.q_end].transpose(0, 1)[None]  # [1, H, n, D]
            kr = pool.dequantize(layer.layer_id, "k", self._gather("k", k_buf, req.kv_indices), q.dtype).transpose(0, 1)[None]
            vr = pool.dequantize(layer.layer_id, "v", self._gather("v", v_buf, req.kv_indices), q.dtype).transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(
                qr, kr, vr, attn_mask=req.mask, is_causal=req.mask is None, scale=layer.scaling, enable_gqa=gqa
            )  # [1, H, n, D]
            o[req.q_start : req.q_end] = out[0].transpose(0, 1)
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
        # index_select into reused buffers, not k_buf[indices] (~4x slower on the CPU).
        lid = layer.layer_id
        kr = pool.dequantize(lid, "k", self._gather("k", k_buf, meta.kv_indices.view(-1)), q.dtype)
        vr = pool.dequantize(lid, "v", self._gather("v", v_buf, meta.kv_indices.view(-1)), q.dtype)
        kr = kr.view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
        vr = vr.view(b, -1, hkv, d).transpose(1, 2)
        if meta.prefix_indices is None:
            out = F.scaled_dot_product_attention(qg, kr, vr, attn_mask=meta.mask, scale=layer.scaling)  # [B, Hkv, G, D]
            return out.reshape(b, h, d)
        kp = pool.dequantize(lid, "k", self._gather("kp", k_buf, meta.prefix_indices), torch.float32)
        vp = pool.dequantize(lid, "v", self._gather("vp", v_buf, meta.prefix_indices), torch.float32)
        return self._cascade_decode(qg, kr, vr, kp, vp, meta, layer.scaling).reshape(b, h, d)

    def _cascade_decode(
        self,
        qg: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        meta: DecodeMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Exact attention over [shared prefix | own suffix] with the prefix read once.

        qg: [B, Hkv, G, D]; ks/vs: [B, Hkv, S, D] (each row's suffix); kp/vp: [P, Hkv, D] fp32 (the
        shared prefix's rows) -> [B, Hkv, G, D]."""
        b, hkv, g, d = qg.shape
        dtype = qg.dtype
        f32 = torch.float32
        kp = kp.transpose(0, 1)  # [Hkv, P, D]
        vp = vp.transpose(0, 1)
        qf = qg.to(f32)
        # Prefix: every query of every row at once, [Hkv, B*G, D] x [Hkv, D, P].
        q_all = qf.permute(1, 0, 2, 3).reshape(hkv, b * g, d)
        s_pre = torch.matmul(q_all, kp.transpose(1, 2)).mul_(scale)  # [Hkv, B*G, P]
        s_suf = torch.matmul(qf, ks.to(f32).transpose(-1, -2)).mul_(scale)  # [B, Hkv, G, S]
        if meta.mask is not None:
            s_suf.masked_fill_(~meta.mask, float("-inf"))
        m_pre = s_pre.amax(-1).view(hkv, b, g).permute(1, 0, 2)  # [B, Hkv, G]
        m = torch.maximum(m_pre, s_suf.amax(-1))  # [B, Hkv, G]
        m_all = m.permute(1, 0, 2).reshape(hkv, b * g, 1)
        p_pre = s_pre.sub_(m_all).exp_()  # [Hkv, B*G, P]
        p_suf = s_suf.sub_(m[..., None]).exp_()  # [B, Hkv, G, S]
        denom = p_pre.sum(-1).view(hkv, b, g).permute(1, 0, 2) + p_suf.sum(-1)  # [B, Hkv, G]
        o_pre = torch.matmul(p_pre, vp).view(hkv, b, g, d).permute(1, 0, 2, 3)  # [B, Hkv, G, D]
        o_suf = torch.matmul(p_suf, vs.to(f32))  # [B, Hkv, G, D]
        return ((o_pre + o_suf) / denom[..., None]).to(dtype)
