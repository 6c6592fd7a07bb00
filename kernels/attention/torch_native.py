"""Reference attention backend in plain torch (CPU and any device), reading K/V from the pool.

Extend: one `scaled_dot_product_attention` per request over its whole sequence (prefix read
from the pool), causal with the diagonal shifted by the prefix length. Short extends (at most
`SHORT_EXTEND` new tokens: select's choices, a follow-up turn over a cached prompt) are padded
into groups and attended with one gather and one call per group and layer: a batch of a hundred
such requests otherwise spends more time in per-request calls than in attention.
Decode: one query per request. A single request attends its slots directly; a batch gathers a
padded [B, max_len] slot table once per step and masks each row past its length. When every
row of a decode batch starts with the same slots (requests sharing a cached prefix, the
few-shot case) that prefix is gathered once and attended by all queries in one matmul
("cascade" attention); each row's own suffix is attended separately and the two parts are
merged exactly through one softmax. A group of short extends whose cached prefixes start with
the same slots (the choices of one select, a batch of them behind one few-shot block) is
attended the same way.

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
# Extends of at most this many new tokens are batched into padded groups (`ExtendGroup`)...
SHORT_EXTEND = 64
# ... each group's padded size (rows x max new x max seq) staying within this factor of its real
# work plus a constant, so one long sequence does not make every row of a group pay for it.
GROUP_WASTE = 2.0
GROUP_SLACK = 1 << 14


@dataclass(slots=True)
class ExtendGroup:
    """Several short extends attended together, padded to [B, N] queries and [B, S] keys."""

    q_rows: torch.Tensor  # [B * N] row of q for each padded query (padding: row 0)
    q_valid: torch.Tensor  # [V] positions in the flattened [B * N] output that are real queries, request-major
    out_rows: torch.Tensor  # [V] the q row each of those real queries answers
    kv_indices: torch.Tensor  # [B * S] pool slots after the shared prefix (padding: slot 0)
    mask: torch.Tensor  # [B, 1, N, S] bool (True = attend)
    shape: tuple[int, int, int]  # (B, N, S)
    prefix_indices: torch.Tensor | None = None  # [P] slots every row starts with, all of them cached (cascade)


@dataclass(slots=True)
class DecodeMetadata:
    kv_indices: torch.Tensor  # [L] for one request; [B, S] slots after the shared prefix (padded with slot 0)
    mask: torch.Tensor | None  # [B, 1, 1, S] bool, None when every row is full
    prefix_indices: torch.Tensor | None = None  # [P] slots every row starts with (cascade), else None


class TorchNativeAttnBackend(AttentionBackend):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.extend_metadata: list[ExtendRequest] = []
        self.extend_groups: list[ExtendGroup] = []
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
        self.extend_groups = []
        starts, q_start = [], 0
        for new in batch.extend_seq_lens_cpu:
            starts.append(q_start)
            q_start += new
        reqs = list(zip(rows, batch.extend_prefix_lens_cpu, batch.extend_seq_lens_cpu, starts))
        short = [r for r in reqs if 0 < r[2] <= SHORT_EXTEND]
        if len(short) > 1:
            for group in _group_by_padding(short):
                if len(group) > 1:
                    self.extend_groups.append(_extend_group(req_to_token, group))
                else:
                    self.extend_metadata.extend(_extend_requests(req_to_token, group))
            reqs = [r for r in reqs if not 0 < r[2] <= SHORT_EXTEND]
        self.extend_metadata.extend(_extend_requests(req_to_token, reqs))

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
        for g in self.extend_groups:
            b, n, s = g.shape
            lid = layer.layer_id
            kg = pool.dequantize(lid, "k", self._gather("k", k_buf, g.kv_indices), q.dtype).view(b, s, *k_buf.shape[1:])
            vg = pool.dequantize(lid, "v", self._gather("v", v_buf, g.kv_indices), q.dtype).view(b, s, *v_buf.shape[1:])
            if g.prefix_indices is not None:
                out = self._cascade_extend(q, kg, vg, g, layer, pool, k_buf, v_buf)  # [B * N, H, D]
            else:
                qg = q.index_select(0, g.q_rows).view(b, n, -1, q.shape[-1]).transpose(1, 2)  # [B, H, N, D]
                out = F.scaled_dot_product_attention(
                    qg, kg.transpose(1, 2), vg.transpose(1, 2), attn_mask=g.mask, scale=layer.scaling, enable_gqa=gqa
                ).transpose(1, 2).reshape(b * n, *o.shape[1:])  # [B, H, N, D] -> [B * N, H, D]
            o.index_copy_(0, g.out_rows, out.index_select(0, g.q_valid))
        return o

    def _cascade_extend(self, q, kg, vg, g: ExtendGroup, layer: AttentionLayer, pool, k_buf, v_buf) -> torch.Tensor:
        """A group's attention with its shared prefix read once: q [T, H, D]; kg/vg [B, S, Hkv, D]
        (each row's keys after the prefix) -> [B * N, H, D] in the padded query order."""
        b, n, s = g.shape
        h, d = q.shape[1], q.shape[2]
        hkv = layer.num_kv_heads
        grp = h // hkv
        lid = layer.layer_id
        # Queries grouped by KV head: [B, Hkv, G * N, D] (head hkv * G + j, query i -> row j * N + i).
        qg = q.index_select(0, g.q_rows).view(b, n, hkv, grp, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, grp * n, d)
        kp = pool.dequantize(lid, "k", self._gather("kp", k_buf, g.prefix_indices), torch.float32)
        vp = pool.dequantize(lid, "v", self._gather("vp", v_buf, g.prefix_indices), torch.float32)
        mask = g.mask[:, :, None].expand(b, 1, grp, n, s).reshape(b, 1, grp * n, s)
        out = self._cascade_decode(qg, kg.transpose(1, 2), vg.transpose(1, 2), kp, vp, mask, layer.scaling)
        return out.view(b, hkv, grp, n, d).permute(0, 3, 1, 2, 4).reshape(b * n, h, d)

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
        return self._cascade_decode(qg, kr, vr, kp, vp, meta.mask, layer.scaling).reshape(b, h, d)

    def _cascade_decode(
        self,
        qg: torch.Tensor,
        ks: torch.Tensor,
        vs: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> torch.Tensor:
        """Exact attention over [shared prefix | own suffix] with the prefix read once.

        qg: [B, Hkv, G, D] (G queries per row and KV head: the heads of a decode step, heads x new
        tokens of an extend); ks/vs: [B, Hkv, S, D] (each row's suffix); kp/vp: [P, Hkv, D] fp32
        (the shared prefix's rows, seen by every query); mask: [B, 1, 1 or G, S] bool over the
        suffix, or None -> [B, Hkv, G, D]."""
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
        if mask is not None:
            s_suf.masked_fill_(~mask, float("-inf"))
        m_pre = s_pre.amax(-1).view(hkv, b, g).permute(1, 0, 2)  # [B, Hkv, G]
        m = torch.maximum(m_pre, s_suf.amax(-1))  # [B, Hkv, G]
        m_all = m.permute(1, 0, 2).reshape(hkv, b * g, 1)
        p_pre = s_pre.sub_(m_all).exp_()  # [Hkv, B*G, P]
        p_suf = s_suf.sub_(m[..., None]).exp_()  # [B, Hkv, G, S]
        denom = p_pre.sum(-1).view(hkv, b, g).permute(1, 0, 2) + p_suf.sum(-1)  # [B, Hkv, G]
        o_pre = torch.matmul(p_pre, vp).view(hkv, b, g, d).permute(1, 0, 2, 3)  # [B, Hkv, G, D]
        o_suf = torch.matmul(p_suf, vs.to(f32))  # [B, Hkv, G, D]
        return ((o_pre + o_suf) / denom[..., None]).to(dtype)


def _extend_requests(req_to_token: torch.Tensor, reqs: list[tuple[int, int, int, int]]) -> list[ExtendRequest]:
    """One `ExtendRequest` per (row, prefix, new, q_start)."""
    out = []
    for row, prefix, new, start in reqs:
        seq = prefix + new
        mask = None
        if prefix:
            # query j (absolute position prefix + j) sees keys 0 .. prefix + j
            keys = torch.arange(seq, device=req_to_token.device)
            queries = torch.arange(prefix, seq, device=req_to_token.device)
            mask = keys[None, :] <= queries[:, None]
        out.append(ExtendRequest(start, start + new, req_to_token[row, :seq], mask))
    return out


def _group_by_padding(reqs: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
    """Split short extends into groups whose padded size stays near their real size: sorted by
    sequence length, a group grows while rows x max new x max seq <= GROUP_WASTE x real + slack."""
    groups: list[list[tuple[int, int, int, int]]] = []
    group: list[tuple[int, int, int, int]] = []
    max_new = max_seq = real = 0
    for req in sorted(reqs, key=lambda r: r[1] + r[2]):
        new, seq = req[2], req[1] + req[2]
        n, s = max(max_new, new), max(max_seq, seq)
        if group and (len(group) + 1) * n * s > GROUP_WASTE * (real + new * seq) + GROUP_SLACK:
            groups.append(group)
            group, n, s, real = [], new, seq, 0
        group.append(req)
        max_new, max_seq, real = n, s, real + new * seq
    if group:
        groups.append(group)
    return groups


def _extend_group(req_to_token: torch.Tensor, reqs: list[tuple[int, int, int, int]]) -> ExtendGroup:
    dev = req_to_token.device
    rows = torch.tensor([r[0] for r in reqs], dtype=torch.int64, device=dev)
    prefix = torch.tensor([r[1] for r in reqs], dtype=torch.int64, device=dev)
    new = torch.tensor([r[2] for r in reqs], dtype=torch.int64, device=dev)
    start = torch.tensor([r[3] for r in reqs], dtype=torch.int64, device=dev)
    b, n, s = len(reqs), max(r[2] for r in reqs), max(r[1] + r[2] for r in reqs)
    qi = torch.arange(n, device=dev)[None, :]  # [1, N]
    valid = qi < new[:, None]  # [B, N]
    q_rows = torch.where(valid, start[:, None] + qi, 0).view(-1)
    q_valid = valid.view(-1).nonzero().squeeze(1)
    keys = torch.arange(s, device=dev)[None, :]  # [1, S]
    seq = prefix + new
    table = req_to_token[rows, :s].masked_fill(keys >= seq[:, None], 0)  # slot 0: the pool's padding slot
    # query i of row b (absolute position prefix_b + i) sees keys 0 .. prefix_b + i of its own sequence;
    # a padding query sees its row's keys too (never an empty row, so no NaN), and its output is dropped.
    mask = (keys[:, None, :] <= (prefix[:, None] + qi)[:, :, None]) & (keys < seq[:, None])[:, None, :]  # [B, N, S]
    # Leading slots that every row shares and has cached (so every query sees them): the cascade's prefix.
    shortest = min(r[1] for r in reqs)
    shared = 0
    if shortest >= CASCADE_MIN_PREFIX:
        differs = (table[:, :shortest] != table[:1, :shortest]).any(0)  # [shortest]
        shared = int(differs.int().argmax()) if bool(differs.any()) else shortest
    if shared >= CASCADE_MIN_PREFIX:
        suffix = table[:, shared:]
        return ExtendGroup(q_rows, q_valid, q_rows[q_valid], suffix.reshape(-1), mask[:, None, :, shared:],
                           (b, n, s - shared), table[0, :shared].clone())  # fmt: skip
    return ExtendGroup(q_rows, q_valid, q_rows[q_valid], table.reshape(-1), mask[:, None], (b, n, s))
