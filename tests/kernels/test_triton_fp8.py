"""fp8 (e4m3) KV cache on the Triton kernels, under Triton's interpreter on the CPU (on a GPU when there
is one): the store kernel quantizes bit for bit as `TokenToKVPool.set_kv_buffer` does, the decode and
extend kernels read the fp8 pool at the layer's scales as the torch references do, and the `triton`
backend gives what `torch_native` gives on the same fp8 pool (prefill, extend over a prefix, decode).

Shapes: GQA ratios 1, 4 and 8, head dims 64 and 128, ragged batches, prefixes 0 and > 0."""

from __future__ import annotations

import pytest
import torch

from loom.kernels.attention import TorchNativeAttnBackend, create_attention_backend
from loom.radix_cache import TokenToKVPool

from attention_steps import Steps, assert_refuses_bfloat16, slot_table
from triton_setup import CUDA, DEVICE, TOL, interpreter, kt  # noqa: F401  (interpreter: autouse fixture)

FP8 = torch.float8_e4m3fn
# (dtype, heads, kv_heads, head_dim): GQA ratios 1, 4 and 8, head dims 64 and 128, fp32 and fp16 queries.
KERNEL_CASES = [(torch.float32, 4, 4, 64), (torch.float16, 4, 4, 64), (torch.float32, 8, 2, 128),
                (torch.float16, 8, 2, 128), (torch.float32, 8, 1, 64)]  # fmt: skip
KERNEL_CASES += [(torch.bfloat16, 8, 2, 128)] if CUDA else []


def fp8_pool(slots: int, kv_heads: int, d: int, dtype: torch.dtype, seed: int, k_mag: float = 3.0, v_mag: float = 0.5):
    """A one-layer fp8 pool with every slot written through `set_kv_buffer` (the torch quantizer):
    K and V of different magnitudes, so their scales differ."""
    gen = torch.Generator().manual_seed(seed)
    pool = TokenToKVPool(slots, dtype, kv_heads, d, 1, DEVICE, kv_dtype=FP8)
    k = (torch.randn(slots + 1, kv_heads, d, generator=gen) * k_mag).to(DEVICE, dtype)
    v = (torch.randn(slots + 1, kv_heads, d, generator=gen) * v_mag).to(DEVICE, dtype)
    pool.set_kv_buffer(0, torch.arange(slots + 1, device=DEVICE), k, v)
    assert pool.k_scale[0] != pool.v_scale[0]
    return pool, gen


def e4m3_edge_values() -> torch.Tensor:
    """Every finite e4m3 value, the midpoints between neighbours (ties to even), one fp32 ulp either side
    of them, values past the saturation point, signed zeros and fp32 subnormals."""
    every = torch.arange(256, dtype=torch.uint8).view(FP8).float()
    every = every[torch.isfinite(every)].unique()
    mids = (every[1:] + every[:-1]) / 2
    up, down = mids.nextafter(torch.tensor(float("inf"))), mids.nextafter(torch.tensor(float("-inf")))
    extra = torch.tensor([448.0, 463.9, 464.0, 500.0, -1e5, 0.0, -0.0, 1e-40, -1e-40, 2.0**-10, -(2.0**-10)])
    return torch.cat([every, mids, up, down, extra])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kv_quantizes_like_the_pool(dtype) -> None:
    """Bit for bit: round to nearest even, saturation at +-448, -0 and e4m3 subnormals, at two scales."""
    kv_heads, d = 2, 64
    gen = torch.Generator().manual_seed(5)
    edge = e4m3_edge_values()
    if dtype == torch.float16:
        edge = edge[edge.abs() < 6e4]
    n_vals = edge.numel() + 24 * kv_heads * d  # a few hundred random values besides (each row: a program)
    n_vals += -n_vals % (kv_heads * d)
    magnitudes = torch.logspace(-4, 3, n_vals - edge.numel())
    values = torch.cat([edge, torch.randn(n_vals - edge.numel(), generator=gen) * magnitudes])
    t = n_vals // (kv_heads * d)
    # k and v as views into one qkv tensor, as the model passes them; v scaled so its edges move.
    qkv = torch.empty(t, 3 * kv_heads, d, dtype=dtype)
    qkv[:, kv_heads : 2 * kv_heads] = values.view(t, kv_heads, d).to(dtype)
    qkv[:, 2 * kv_heads :] = values.flip(0).view(t, kv_heads, d).to(dtype)
    qkv = qkv.to(DEVICE)
    _, k, v = qkv.split([kv_heads] * 3, dim=1)
    scales = ([1.0], [0.37])  # 1.0: the edge values land on e4m3 ties exactly
    ours, ref = (TokenToKVPool(t + 5, dtype, kv_heads, d, 1, DEVICE, kv_dtype=FP8, scales=scales) for _ in range(2))
    loc = (torch.randperm(t + 5, generator=gen)[:t] + 1).to(DEVICE)
    kt.store_kv(ours.k_buffer[0], ours.v_buffer[0], loc, k, v, 1.0, 0.37)
    ref.set_kv_buffer(0, loc, k, v)
    for got, want in ((ours.k_buffer[0], ref.k_buffer[0]), (ours.v_buffer[0], ref.v_buffer[0])):
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert (ours.k_buffer[0].view(torch.uint8)[loc] == 0x80).any(), "negative zeros were stored as -0"


@pytest.mark.parametrize("dtype, heads, kv_heads, d", KERNEL_CASES)
def test_decode_attention_reads_fp8(dtype, heads, kv_heads, d) -> None:
    lens = [1, 45, 7, 20]  # ragged; with 4 splits the 1-token request has three empty splits
    pool, gen = fp8_pool(128, kv_heads, d, dtype, seed=heads + d)
    k_buf, v_buf = pool.get_kv_buffer(0)
    table = slot_table(lens, 128, gen)
    rows = torch.tensor([len(lens) - i for i in range(len(lens))], device=DEVICE)
    q = torch.randn(len(lens), heads, d, generator=gen).to(DEVICE, dtype)
    seq_lens = torch.tensor(lens, device=DEVICE)
    scales = {"k_scale": pool.k_scale[0], "v_scale": pool.v_scale[0]}
    out = kt.decode_attention(q, k_buf, v_buf, table, rows, seq_lens, d**-0.5, 4, **scales)
    ref = kt.decode_attention_torch(q, k_buf, v_buf, table, rows, seq_lens, d**-0.5, **scales)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])
    # The reference itself reads the pool as the torch_native backend does: fp8 * scale.
    k0 = pool.dequantize(0, "k", k_buf[table[rows[1], :45]], torch.float32)
    assert torch.equal(k0, k_buf[table[rows[1], :45]].float() * scales["k_scale"])


@pytest.mark.parametrize("dtype, heads, kv_heads, d", KERNEL_CASES)
def test_extend_attention_reads_fp8(dtype, heads, kv_heads, d) -> None:
    prefix_lens, extend_lens = [0, 30, 5], [7, 36, 1]  # no prefix; a prefix with 2 query blocks; 1 new token
    seq = [p + n for p, n in zip(prefix_lens, extend_lens)]
    pool, gen = fp8_pool(128, kv_heads, d, dtype, seed=heads * d)
    k_buf, v_buf = pool.get_kv_buffer(0)
    table = slot_table(seq, 128, gen)
    rows = torch.tensor([len(seq) - i for i in range(len(seq))], device=DEVICE)
    q = torch.randn(sum(extend_lens), heads, d, generator=gen).to(DEVICE, dtype)
    as_t = lambda xs: torch.tensor(xs, device=DEVICE)  # noqa: E731
    scales = {"k_scale": pool.k_scale[0], "v_scale": pool.v_scale[0]}
    out = kt.extend_attention(
        q, k_buf, v_buf, table, rows, as_t([0, 7, 43]), as_t(prefix_lens), as_t(extend_lens), max(extend_lens),
        d**-0.5, **scales,
    )  # fmt: skip
    ref = kt.extend_attention_torch(q, k_buf, v_buf, table.cpu(), rows, prefix_lens, extend_lens, d**-0.5, **scales)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


def fp8_steps(backend, kv_heads: int, d: int, dtype: torch.dtype) -> Steps:
    steps = Steps(backend, kv_heads, d, dtype)
    steps.pool = TokenToKVPool(400, dtype, kv_heads, d, 1, DEVICE, kv_dtype=FP8)
    return steps


BACKEND_CASES = [(torch.float32, 8, 2, 64), (torch.float16, 4, 4, 128)]
BACKEND_CASES += [(torch.bfloat16, 8, 1, 128)] if CUDA else []


@pytest.mark.parametrize("dtype, heads, kv_heads, d", BACKEND_CASES)
def test_backend_on_fp8_pool_matches_torch_native(dtype, heads, kv_heads, d) -> None:
    """Prefill (which calibrates the layer's scales), an extend over cached prefixes, then batched decode:
    the same scales, the same fp8 bytes in the pool, and the same outputs as torch_native's fp8 path."""
    triton_steps = fp8_steps(create_attention_backend("triton", DEVICE), kv_heads, d, dtype)
    native_steps = fp8_steps(TorchNativeAttnBackend(DEVICE), kv_heads, d, dtype)
    gen = torch.Generator().manual_seed(11)
    # The kernels fold the scales into fp32 scores and outputs; torch_native rounds K * scale and V * scale to
    # the compute dtype first: the same in fp32 up to rounding order, a little apart in fp16 / bf16.
    tol = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]

    def both(rows: list[int], new: list[int], decode: bool = False) -> None:
        qkv = (torch.randn(sum(new), heads + 2 * kv_heads, d, generator=gen) * 2).to(DEVICE, dtype)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # views, as the model passes them
        got = triton_steps.run(rows, new, q, k, v, decode)
        want = native_steps.run(rows, new, q, k, v, decode)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)

    both([0, 1], [9, 3])  # prefill, no prefix
    assert triton_steps.pool.k_scale == native_steps.pool.k_scale and triton_steps.pool.k_scale[0] is not None
    assert triton_steps.pool.v_scale == native_steps.pool.v_scale
    both([1, 2, 0], [17, 4, 2])  # extend: prefixes 3, 0, 9
    for _ in range(2):
        both([2, 0, 1], [1, 1, 1], decode=True)
    both([1], [1], decode=True)  # a batch of one
    for got, want in zip(triton_steps.pool.get_kv_buffer(0), native_steps.pool.get_kv_buffer(0)):
        assert got.dtype == FP8 and torch.equal(got.view(torch.uint8), want.view(torch.uint8))


@pytest.mark.skipif(CUDA, reason="the interpreter's limitation")
def test_interpreter_refuses_bfloat16_compute_over_fp8() -> None:
    """The dtype that matters is the compute dtype (the pool's `dtype`), not the fp8 buffers'."""
    assert_refuses_bfloat16(fp8_steps(create_attention_backend("triton", DEVICE), 2, 64, torch.bfloat16))
