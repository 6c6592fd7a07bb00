"""torch_native decode attention against plain per-request attention, with and without a shared
prefix (the cascade path), ragged lengths, GQA, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from loom.kernels.attention import create_attention_backend
from loom.kernels.attention.base import AttentionLayer
from loom.kernels.attention.torch_native import CASCADE_MIN_PREFIX
from loom.radix_cache import ReqToTokenPool, TokenToKVPool
from loom.runtime.forward_batch import ForwardBatch, ForwardMode


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
