"""The small Triton kernels (RMSNorm with fused residual add, rotary embedding, token-bitmask apply,
KV-cache store) against their torch references, under Triton's interpreter on the CPU (on a GPU when
there is one): fp32 and fp16 (bf16 only on a GPU)."""

from __future__ import annotations

import pytest
import torch

from loom.radix_cache import TokenToKVPool
from loom.runtime.layers.layernorm import RMSNorm
from loom.runtime.layers.rotary import RotaryEmbedding

from triton_setup import DEVICE, DTYPES, TOL, interpreter, kt  # noqa: F401  (interpreter: autouse fixture)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])  # 96: not a power of two, the block is masked
def test_rmsnorm_matches_layer(dtype, hidden) -> None:
    gen = torch.Generator().manual_seed(hidden)
    norm = RMSNorm(hidden, eps=1e-5)
    norm.weight.copy_(torch.rand(hidden, generator=gen) + 0.5)
    norm = norm.to(DEVICE, dtype)
    x = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    residual = torch.randn(5, hidden, generator=gen).to(DEVICE, dtype)
    torch.testing.assert_close(kt.rmsnorm(x, norm.weight, norm.eps), norm(x), atol=TOL[dtype], rtol=TOL[dtype])
    out, res = kt.rmsnorm(x, norm.weight, norm.eps, residual=residual)
    ref_out, ref_res = norm(x, residual)
    torch.testing.assert_close(res, ref_res, atol=0, rtol=0)  # x + residual, rounded once to the dtype
    torch.testing.assert_close(out, ref_out, atol=TOL[dtype], rtol=TOL[dtype])
    assert out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", [(4, 4, 64), (8, 2, 128)])
def test_rotary_matches_layer(dtype, heads, kv_heads, d) -> None:
    rope = RotaryEmbedding(d, 64, {"rope_type": "default", "rope_theta": 10000.0}).to(DEVICE)
    gen = torch.Generator().manual_seed(d)
    positions = torch.tensor([0, 5, 63, 1, 2, 17], device=DEVICE)  # ragged requests, flattened
    qkv = torch.randn(6, heads + 2 * kv_heads, d, generator=gen).to(DEVICE, dtype)
    ref = qkv.clone()
    q, k, _ = qkv.split([heads, kv_heads, kv_heads], dim=1)  # views into one tensor, as the model has them
    kt.apply_rotary_(positions, q, k, rope.cos_sin_cache)
    rq, rk, _ = ref.split([heads, kv_heads, kv_heads], dim=1)
    rope(positions, rq, rk)
    torch.testing.assert_close(qkv, ref, atol=TOL[dtype], rtol=TOL[dtype])  # v untouched, q and k rotated
    assert torch.equal(qkv[:, heads + kv_heads :], ref[:, heads + kv_heads :])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [32, 70, 1500])  # a whole word, a partial last word, several blocks
def test_bitmask_matches_torch(dtype, vocab) -> None:
    gen = torch.Generator().manual_seed(vocab)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31, (3, words), generator=gen, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1  # every token allowed
    bitmask[2] = 0  # none
    logits = torch.randn(3, vocab, generator=gen).to(DEVICE, dtype)
    ref = logits.clone()
    kt.apply_token_bitmask_inplace(logits, bitmask.to(DEVICE))
    kt.apply_token_bitmask_inplace_torch(ref, bitmask.to(DEVICE))
    assert torch.equal(logits, ref)
    assert torch.isfinite(logits[1]).all() and torch.isneginf(logits[2]).all()
    token = 37 % vocab  # spot-check the bit layout: bit t % 32 of word t // 32
    allowed = bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1)
    assert bool(torch.isfinite(logits[0, token])) == allowed


def test_bitmask_torch_reference_layout() -> None:
    logits = torch.zeros(1, 40)
    bitmask = torch.tensor([[0b101, 1 << 3]], dtype=torch.int32)  # tokens 0, 2 and 32 + 3
    kt.apply_token_bitmask_inplace_torch(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [0, 2, 35]


@pytest.mark.parametrize("dtype", DTYPES)
def test_store_kv_matches_set_kv_buffer(dtype) -> None:
    kv_heads, d = 2, 64
    gen = torch.Generator().manual_seed(1)
    ours, ref = (TokenToKVPool(50, dtype, kv_heads, d, 1, DEVICE) for _ in range(2))
    qkv = torch.randn(7, 4 + 2 * kv_heads, d, generator=gen).to(DEVICE)  # fp32 k/v cast into the pool dtype
    _, k, v = qkv.split([4, kv_heads, kv_heads], dim=1)
    loc = torch.tensor([3, 9, 1, 50, 4, 22, 8], device=DEVICE)
    kt.store_kv(ours.k_buffer[0], ours.v_buffer[0], loc, k, v)
    ref.set_kv_buffer(0, loc, k, v)
    assert torch.equal(ours.k_buffer[0], ref.k_buffer[0]) and torch.equal(ours.v_buffer[0], ref.v_buffer[0])


def test_engine_mask_apply_dispatches_to_the_kernel_with_rows() -> None:
    """The scheduler's apply_token_bitmask_ (rows subset, as for a batch where only some requests
    have grammars) gives the same logits through the Triton kernel as through torch."""
    from loom.runtime.constrained.bitmask import apply_token_bitmask_

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 100, generator=gen)
    bitmask = torch.randint(-(2**31), 2**31, (2, 4), generator=gen, dtype=torch.int64).to(torch.int32)
    rows = torch.tensor([3, 1])
    for r in (rows, None):
        want, got = logits.clone(), logits.clone()
        mask = bitmask if r is not None else torch.cat([bitmask, bitmask, bitmask[:1]])
        apply_token_bitmask_(want, mask, r, use_triton=False)
        apply_token_bitmask_(got, mask, r, use_triton=True)
        assert torch.equal(want, got)
