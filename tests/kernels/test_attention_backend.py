"""torch_native decode attention against plain per-request attention, with and without a shared
prefix (the cascade path), ragged lengths, GQA, fp32 and bf16; extend attention (short extends
batched into padded groups, long ones per request) against causal attention per request."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels.attention import create_attention_backend
from loom.kernels.attention.base import AttentionLayer
from loom.kernels.attention.torch_native import CASCADE_MIN_PREFIX, SHORT_EXTEND
from loom.radix_cache import ReqToTokenPool, TokenToKVPool
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode


def reference(q, k_buf, v_buf, rows: list[torch.Tensor], scale: float) -> torch.Tensor:
    outs = []
    for i, slots in enumerate(rows):
        k = k_buf[slots].transpose(0, 1).float()  # [Hkv, L, D]
        v = v_buf[slots].transpose(0, 1).float()
        qi = q[i : i + 1].transpose(0, 1).float()  # [H, 1, D]
        outs.append(F.scaled_dot_product_attention(qi, k, v, scale=scale, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)  # [B, H, D]


@pytest.mark.parametrize("shared", [0, CASCADE_MIN_PREFIX + 5, 100])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_matches_per_request_attention(shared, heads, kv_heads, dtype):
    torch.manual_seed(0)
    d, batch, capacity = 32, 5, 2000
    pool = TokenToKVPool(capacity, dtype, kv_heads, d, 1)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    req_to_token = ReqToTokenPool(batch, 512)
    prefix = torch.randperm(capacity - 1)[:shared] + 1
    lens = [shared + n for n in (3, 17, 1, 40, 9)]
    rows = []
    for i, n in enumerate(lens):
        own = torch.randint(1, capacity + 1, (n - shared,))
        slots = torch.cat([prefix, own])
        req_to_token.req_to_token[i, :n] = slots
        rows.append(slots)
    q = torch.randn(batch, heads, d, dtype=dtype)
    last = torch.tensor([int(r[-1]) for r in rows])
    fb = ForwardBatch(
        mode=ForwardMode.DECODE,
        batch_size=batch,
        input_ids=torch.zeros(batch, dtype=torch.int64),
        positions=torch.tensor(lens) - 1,
        out_cache_loc=last,
        req_pool_indices=torch.arange(batch),
        seq_lens=torch.tensor(lens),
        seq_lens_cpu=lens,
        req_to_token_pool=req_to_token,
        token_to_kv_pool=pool,
    )
    backend = create_attention_backend("torch_native", "cpu")
    backend.init_forward_metadata(fb)
    uses_cascade = backend.decode_metadata.prefix_indices is not None
    assert uses_cascade == (shared >= CASCADE_MIN_PREFIX)
    # The step's own k/v are written at out_cache_loc first: pass the values already there.
    k_new, v_new = pool.k_buffer[0][last].clone(), pool.v_buffer[0][last].clone()
    layer = AttentionLayer(0, heads, kv_heads, d, d**-0.5)
    out = backend.forward(q, k_new, v_new, layer, fb)
    ref = reference(q, pool.k_buffer[0], pool.v_buffer[0], rows, d**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("shared", [0, CASCADE_MIN_PREFIX, 120])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_matches_per_request_causal_attention(shared, heads, kv_heads, dtype):
    """A mixed extend batch: short extends over long and short cached prefixes (grouped, one of
    them alone in its group), a short one from scratch, and a long prefill (per request). With
    `shared`, the cached prefixes of 150 tokens or more start with the same slots (choices behind
    one few-shot block): their group reads those once (cascade)."""
    torch.manual_seed(0)
    d, capacity = 32, 4000
    prefixes = [150, 0, 151, 7, 900, 0, 160]
    news = [5, 12, 1, SHORT_EXTEND, 3, SHORT_EXTEND + 30, 20]
    pool = TokenToKVPool(capacity, dtype, kv_heads, d, 1)
    pool.k_buffer[0].normal_()
    pool.v_buffer[0].normal_()
    req_to_token = ReqToTokenPool(len(news), 1200)
    free = (torch.randperm(capacity - 1) + 1).tolist()
    common = [free.pop() for _ in range(shared)]
    rows, new_slots = [], []
    for i, (p, n) in enumerate(zip(prefixes, news)):
        lead = common if p >= 150 else []
        slots = torch.tensor(lead + [free.pop() for _ in range(p + n - len(lead))])
        req_to_token.req_to_token[i, : p + n] = slots
        rows.append(slots)
        new_slots.append(slots[p:])
    total = sum(news)
    q = torch.randn(total, heads, d, dtype=dtype)
    out_cache_loc = torch.cat(new_slots)
    lens = [p + n for p, n in zip(prefixes, news)]
    fb = ForwardBatch(
        mode=ForwardMode.EXTEND,
        batch_size=len(news),
        input_ids=torch.zeros(total, dtype=torch.int64),
        positions=torch.cat([torch.arange(p, p + n) for p, n in zip(prefixes, news)]),
        out_cache_loc=out_cache_loc,
        req_pool_indices=torch.arange(len(news)),
        seq_lens=torch.tensor(lens),
        seq_lens_cpu=lens,
        extend_prefix_lens_cpu=prefixes,
        extend_seq_lens_cpu=news,
        req_to_token_pool=req_to_token,
        token_to_kv_pool=pool,
    )
    backend = create_attention_backend("torch_native", "cpu")
    backend.init_forward_metadata(fb)
    grouped = sum(g.shape[0] for g in backend.extend_groups)
    assert backend.extend_groups and grouped + len(backend.extend_metadata) == len(news)
    cascaded = [g for g in backend.extend_groups if g.prefix_indices is not None]
    assert len(cascaded) == (shared >= CASCADE_MIN_PREFIX)
    k_new, v_new = pool.k_buffer[0][out_cache_loc].clone(), pool.v_buffer[0][out_cache_loc].clone()
    layer = AttentionLayer(0, heads, kv_heads, d, d**-0.5)
    out = backend.forward(q, k_new, v_new, layer, fb)
    refs, start = [], 0
    for slots, p, n in zip(rows, prefixes, news):
        k = pool.k_buffer[0][slots].transpose(0, 1).float()  # [Hkv, L, D]
        v = pool.v_buffer[0][slots].transpose(0, 1).float()
        qi = q[start : start + n].transpose(0, 1).float()  # [H, n, D]
        mask = torch.arange(p + n)[None, :] <= torch.arange(p, p + n)[:, None]
        refs.append(F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=d**-0.5, enable_gqa=True).transpose(0, 1))
        start += n
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), torch.cat(refs), atol=tol, rtol=tol)
