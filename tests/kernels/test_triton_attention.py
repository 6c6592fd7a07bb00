"""Triton decode and extend attention against their torch references, under Triton's interpreter on
the CPU (on a GPU when there is one): ragged batches, prefix lengths 0 and > 0, GQA ratios 1 and 4,
head dims 64 and 128, fp32 and fp16 (bf16 only on a GPU: the interpreter's bf16 `tl.dot` is wrong);
then the `triton` backend against `torch_native` through the same ForwardBatch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from loom.kernels.attention import TorchNativeAttnBackend, create_attention_backend

from attention_steps import Steps, assert_refuses_bfloat16, slot_table
from triton_setup import CUDA, DEVICE, DTYPES, TOL, interpreter, kt  # noqa: F401  (interpreter: autouse fixture)


def random_pool(slots: int, kv_heads: int, d: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, kv_heads, d, generator=gen).to(DEVICE, dtype)
    v = torch.randn(slots, kv_heads, d, generator=gen).to(DEVICE, dtype)
    return k, v, gen


GEOMETRIES = [(4, 4, 64), (8, 2, 128)]  # (heads, kv_heads, head_dim): GQA ratio 1 at d=64, 4 at d=128


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", GEOMETRIES)
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_attention_matches_torch(dtype, heads, kv_heads, d, splits) -> None:
    lens = [1, 45, 7, 20]  # ragged; with 4 splits the 1-token request has three empty splits
    k_buf, v_buf, gen = random_pool(128, kv_heads, d, dtype, seed=heads + d)
    table = slot_table(lens, 128, gen)
    rows = torch.tensor([len(lens) - i for i in range(len(lens))], device=DEVICE)
    q = torch.randn(len(lens), heads, d, generator=gen).to(DEVICE, dtype)
    seq_lens = torch.tensor(lens, device=DEVICE)
    out = kt.decode_attention(q, k_buf, v_buf, table, rows, seq_lens, d**-0.5, splits)
    ref = kt.decode_attention_torch(q, k_buf, v_buf, table, rows, seq_lens, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, d", GEOMETRIES)
def test_extend_attention_matches_torch(dtype, heads, kv_heads, d) -> None:
    prefix_lens, extend_lens = [0, 30, 5], [7, 36, 1]  # no prefix; a prefix with 2 query blocks; 1 new token
    seq = [p + n for p, n in zip(prefix_lens, extend_lens)]
    k_buf, v_buf, gen = random_pool(128, kv_heads, d, dtype, seed=heads * d)
    table = slot_table(seq, 128, gen)
    rows = torch.tensor([len(seq) - i for i in range(len(seq))], device=DEVICE)
    q = torch.randn(sum(extend_lens), heads, d, generator=gen).to(DEVICE, dtype)
    starts = torch.tensor([0, 7, 43], device=DEVICE)
    as_t = lambda xs: torch.tensor(xs, device=DEVICE)  # noqa: E731
    out = kt.extend_attention(
        q, k_buf, v_buf, table, rows, starts, as_t(prefix_lens), as_t(extend_lens), max(extend_lens), d**-0.5
    )
    ref = kt.extend_attention_torch(q, k_buf, v_buf, table.cpu(), rows, prefix_lens, extend_lens, d**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


# ----------------------------------------------------------------------------- the backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backend_matches_torch_native(dtype) -> None:
    """Prefill, an extend over cached prefixes, then batched decode: the same outputs and the same pool."""
    heads, kv_heads, d = 8, 2, 64
    triton_steps = Steps(create_attention_backend("triton", DEVICE), kv_heads, d, dtype)
    native_steps = Steps(TorchNativeAttnBackend(DEVICE), kv_heads, d, dtype)
    gen = torch.Generator().manual_seed(7)

    def both(rows: list[int], new: list[int], decode: bool = False) -> None:
        t = sum(new)
        qkv = torch.randn(t, heads + 2 * kv_heads, d, generator=gen).to(DEVICE, dtype)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)  # views, as the model passes them
        got = triton_steps.run(rows, new, q, k, v, decode)
        want = native_steps.run(rows, new, q, k, v, decode)
        torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype], rtol=TOL[dtype])

    both([0, 1], [9, 3])  # prefill, no prefix
    both([1, 2, 0], [17, 4, 2])  # extend: prefixes 3, 0, 9
    for _ in range(2):
        both([2, 0, 1], [1, 1, 1], decode=True)
    both([1], [1], decode=True)  # a batch of one
    assert torch.equal(triton_steps.pool.k_buffer[0], native_steps.pool.k_buffer[0])
    assert torch.equal(triton_steps.pool.v_buffer[0], native_steps.pool.v_buffer[0])


@pytest.mark.skipif(CUDA, reason="the interpreter's limitation")
def test_interpreter_refuses_bfloat16() -> None:
    assert_refuses_bfloat16(Steps(create_attention_backend("triton", DEVICE), 2, 64, torch.bfloat16))


@pytest.mark.skipif(CUDA, reason="the interpreter is for machines without a GPU")
def test_triton_imported_before_the_interpreter_is_named() -> None:
    code = (
        "import os, triton\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "from loom.kernels.attention import create_attention_backend\n"
        "create_attention_backend('triton', 'cpu')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "imported before TRITON_INTERPRET=1 was set" in proc.stderr, proc.stderr[-2000:]


def test_registry_picks_triton_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from loom.kernels.attention.triton_backend import TritonAttnBackend

    assert isinstance(create_attention_backend("auto", "cpu"), TorchNativeAttnBackend)  # auto stays native on CPU
    assert isinstance(create_attention_backend("triton", "cpu"), TritonAttnBackend)  # the interpreter is on here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="'triton' is not available yet on device 'cpu'.*TRITON_INTERPRET=1"):
        create_attention_backend("triton", "cpu")
    with pytest.raises(ValueError, match=r"unknown attention backend 'nope'.*'torch_native', 'triton'"):
        create_attention_backend("nope", "cpu")
