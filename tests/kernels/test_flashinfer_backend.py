"""The flashinfer attention backend without a GPU: how "auto" picks a backend, the errors when
flashinfer cannot be used, the CSR page tables built from `req_to_token`, and the plan/run
plumbing against a stand-in for FlashInfer's paged wrappers (attention computed from the planned
tables, as FlashInfer defines it) compared with torch_native, eager and through graph buffers."""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import loom.kernels.attention as attention
import loom.kernels.attention.flashinfer_backend as fib
from loom.kernels.attention import create_attention_backend, resolve_backend_name
from loom.kernels.attention.base import AttentionLayer
from loom.radix_cache import ReqToTokenPool, TokenToKVPool
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode


@pytest.mark.parametrize(
    "device, installed, expected",
    [
        ("cpu", {"flashinfer", "triton"}, "torch_native"),
        ("cuda", {"flashinfer", "triton"}, "flashinfer"),
        ("cuda", {"triton"}, "triton"),
        ("cuda", set(), "torch_native"),
    ],
)
def test_auto_picks_by_device_and_installed(monkeypatch, device: str, installed: set[str], expected: str) -> None:
    monkeypatch.setattr(attention, "_installed", lambda module: module in installed)
    assert resolve_backend_name("auto", device) == expected
    assert resolve_backend_name("triton", device) == "triton"  # a named backend is kept as it is


@pytest.mark.parametrize("kv_dtype, head_dim", [(torch.float32, 128), (torch.float8_e4m3fn, 128), (torch.bfloat16, 16)])
def test_auto_leaves_flashinfer_for_models_it_does_not_fit(monkeypatch, kv_dtype, head_dim) -> None:
    monkeypatch.setattr(attention, "_installed", lambda module: True)
    assert resolve_backend_name("auto", "cuda", torch.bfloat16, 128) == "flashinfer"
    assert resolve_backend_name("auto", "cuda", kv_dtype, head_dim) == "triton"


def test_flashinfer_errors_say_what_to_do(monkeypatch) -> None:
    with pytest.raises(ValueError, match="'flashinfer' needs CUDA, not device 'cpu'"):
        create_attention_backend("flashinfer", "cpu")
    monkeypatch.setattr(attention, "_installed", lambda module: False)
    with pytest.raises(ValueError, match=r"not installed: pip install flashinfer-python \(or pip install 'loom\[cuda\]'\)"):
        create_attention_backend("flashinfer", "cuda")
    with pytest.raises(ValueError, match="expected 'auto' or one of .*'flashinfer'"):
        create_attention_backend("flashinfer2", "cpu")


def test_kv_indices_match_per_request_slots() -> None:
    gen = torch.Generator().manual_seed(0)
    req_to_token = torch.randint(1, 1000, (6, 40), generator=gen)
    rows, lens = [4, 0, 5, 2], [7, 1, 40, 13]
    indptr = fib.indptr_for(lens)
    assert indptr.dtype == torch.int32 and indptr.tolist() == [0, 7, 8, 48, 61]
    got = fib.build_kv_indices(req_to_token, torch.tensor(rows), torch.tensor(lens), sum(lens))
    want = torch.cat([req_to_token[r, :n] for r, n in zip(rows, lens)])
    assert got.dtype == torch.int32 and torch.equal(got, want.int())
    assert fib.indptr_for([3, 0, 5]).tolist() == [0, 3, 3, 8]  # qo_indptr of an extend with a request adding nothing


# ---------------------------------------------------------------- a stand-in for flashinfer's wrappers
def _paged_attention(q, k_cache, v_cache, qo_indptr, kv_indptr, kv_indices, scale):
    """FlashInfer's definition: request i's queries (rows qo_indptr[i]:qo_indptr[i+1]) attend its pages
    kv_indices[kv_indptr[i]:kv_indptr[i+1]], causal aligned to the end (bottom-right)."""
    out = torch.empty_like(q)
    for i in range(len(kv_indptr) - 1):
        q0, q1, k0, k1 = int(qo_indptr[i]), int(qo_indptr[i + 1]), int(kv_indptr[i]), int(kv_indptr[i + 1])
        pages = kv_indices[k0:k1].long()
        k = k_cache[pages, 0].transpose(0, 1)  # [Hkv, L, D]
        v = v_cache[pages, 0].transpose(0, 1)
        n, length = q1 - q0, k1 - k0
        mask = torch.arange(length)[None, :] <= (length - n + torch.arange(n))[:, None]  # [n, L]
        qi = q[q0:q1].transpose(0, 1)  # [H, n, D]
        out[q0:q1] = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True).transpose(0, 1)
    return out


class FakeDecodeWrapper:
    def __init__(self, workspace, layout, use_cuda_graph=False, use_tensor_cores=False,
                 paged_kv_indptr_buffer=None, paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None):  # fmt: skip
        assert layout == "NHD"
        self.use_cuda_graph = use_cuda_graph
        self.buffers = (paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer)

    def plan(self, indptr, indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        assert page_size == 1 and bool((last_page_len == 1).all()) and indptr.dtype == indices.dtype == torch.int32
        assert int(indptr[-1]) == indices.numel()
        self.heads, self.scale = (num_qo_heads, num_kv_heads, head_dim), kw["sm_scale"]
        if self.use_cuda_graph:  # as FlashInfer does: the tables go into the fixed buffers, the batch size is fixed
            indptr_buf, indices_buf, _ = self.buffers
            assert indptr.numel() == indptr_buf.numel(), "a graph wrapper's batch size cannot change"
            indptr_buf.copy_(indptr)
            indices_buf[: indices.numel()].copy_(indices)
            indptr, indices = indptr_buf, indices_buf
        self.indptr, self.indices = indptr, indices

    def run(self, q, kv):
        assert q.shape[1:] == (self.heads[0], self.heads[2])
        return _paged_attention(q, *kv, torch.arange(q.shape[0] + 1), self.indptr, self.indices, self.scale)


class FakePrefillWrapper:
    def __init__(self, workspace, layout):
        assert layout == "NHD"

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, **kw):
        assert page_size == 1 and kw["causal"] is True
        self.tables, self.scale = (qo_indptr, kv_indptr, kv_indices), kw["sm_scale"]

    def run(self, q, kv):
        return _paged_attention(q, *kv, *self.tables, self.scale)


@pytest.fixture
def fake_flashinfer(monkeypatch):
    module = types.SimpleNamespace(
        BatchDecodeWithPagedKVCacheWrapper=FakeDecodeWrapper, BatchPrefillWithPagedKVCacheWrapper=FakePrefillWrapper
    )
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    monkeypatch.setattr(fib, "WORKSPACE_BYTES", 1024)


def _batches(pool, req_to_token_pool):
    """An extend batch (two requests over cached prefixes, one fresh) and a decode batch after it."""
    prefix, new = [5, 0, 12], [3, 4, 1]
    lens = [p + n for p, n in zip(prefix, new)]
    rows = [2, 0, 1]
    slot = iter(range(1, 200))
    for row, n in zip(rows, lens):
        req_to_token_pool.req_to_token[row, : n + 1] = torch.tensor([next(slot) for _ in range(n + 1)])
    out_loc = torch.cat([req_to_token_pool.req_to_token[r, p:n] for r, p, n in zip(rows, prefix, lens)])
    extend = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=3, input_ids=torch.zeros(sum(new), dtype=torch.int64),
        positions=torch.zeros(sum(new), dtype=torch.int64), out_cache_loc=out_loc, req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(lens), seq_lens_cpu=lens, extend_prefix_lens_cpu=prefix, extend_seq_lens_cpu=new,
    )  # fmt: skip
    dec_lens = [n + 1 for n in lens]
    decode = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=3, input_ids=torch.zeros(3, dtype=torch.int64),
        positions=torch.tensor(lens), out_cache_loc=torch.stack([req_to_token_pool.req_to_token[r, n] for r, n in zip(rows, lens)]),
        req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(dec_lens), seq_lens_cpu=dec_lens,
    )  # fmt: skip
    for fb in (extend, decode):
        fb.req_to_token_pool, fb.token_to_kv_pool = req_to_token_pool, pool
    return extend, decode


def test_plan_and_run_match_torch_native(fake_flashinfer) -> None:
    torch.manual_seed(0)
    heads, kv_heads, d = 8, 2, 16
    layer = AttentionLayer(0, heads, kv_heads, d, d**-0.5)
    pools = [TokenToKVPool(256, torch.float32, kv_heads, d, 1) for _ in range(2)]
    for pool in pools[1:]:
        pool.k_buffer[0].copy_(pools[0].k_buffer[0].normal_())
        pool.v_buffer[0].copy_(pools[0].v_buffer[0].normal_())
    r2t = ReqToTokenPool(4, 64)
    native = create_attention_backend("torch_native", "cpu")
    fi = fib.FlashInferAttnBackend("cpu")
    fi.bind_model(layer, torch.bfloat16, torch.bfloat16)
    fi.spec = dataclasses.replace(fi.spec, dtype=torch.float32, kv_dtype=torch.float32)  # exact comparisons on the CPU
    outs = []
    for backend, pool in zip((native, fi), pools):
        extend, decode = _batches(pool, r2t)
        torch.manual_seed(1)
        t = extend.out_cache_loc.numel()
        q, k, v = torch.randn(t, heads, d), torch.randn(t, kv_heads, d), torch.randn(t, kv_heads, d)
        backend.init_forward_metadata(extend)
        o_ext = backend.forward(q, k, v, layer, extend)
        q, k, v = torch.randn(3, heads, d), torch.randn(3, kv_heads, d), torch.randn(3, kv_heads, d)
        backend.init_forward_metadata(decode)
        outs.append((o_ext, backend.forward(q, k, v, layer, decode), (q, k, v), decode))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5)  # extend over cached prefixes
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)  # decode
    torch.testing.assert_close(pools[1].k_buffer[0], pools[0].k_buffer[0])  # the same K/V stored at the same slots

    # The same decode step padded to a captured batch of 4 (the graph runner's padding row: row 0, one slot, slot 0).
    q, k, v, decode = *outs[1][2], outs[1][3]
    fi.init_cuda_graph_state(max_bs=4, max_context_len=64)
    pad = lambda t, value: torch.cat([t, torch.tensor([value])])  # noqa: E731
    static = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=4, input_ids=torch.zeros(4, dtype=torch.int64), positions=torch.zeros(4, dtype=torch.int64),
        out_cache_loc=torch.zeros(4, dtype=torch.int64), req_pool_indices=torch.zeros(4, dtype=torch.int64),
        seq_lens=torch.ones(4, dtype=torch.int64), seq_lens_cpu=[1] * 4, req_to_token_pool=r2t, token_to_kv_pool=pools[1],
    )  # fmt: skip
    fi.init_forward_metadata_capture(static)
    static.out_cache_loc.copy_(pad(decode.out_cache_loc, 0))
    static.req_pool_indices.copy_(pad(decode.req_pool_indices, 0))
    static.seq_lens.copy_(pad(decode.seq_lens, 1))
    static.seq_lens_cpu = [*decode.seq_lens_cpu, 1]
    fi.init_forward_metadata_replay(static)
    o = fi.forward(torch.cat([q, q[:1]]), torch.cat([k, k[:1]]), torch.cat([v, v[:1]]), layer, static)
    torch.testing.assert_close(o[:3], outs[0][1], atol=1e-5, rtol=1e-5)
    assert torch.equal(fi.graph_kv_indices[: sum(static.seq_lens_cpu)], fib.build_kv_indices(
        r2t.req_to_token, static.req_pool_indices, static.seq_lens, sum(static.seq_lens_cpu)))  # fmt: skip


def test_bind_model_rejects_fp32_and_fp8_kv(fake_flashinfer) -> None:
    fi = fib.FlashInferAttnBackend("cpu")
    layer = AttentionLayer(0, 8, 2, 16, 0.25)
    fi.bind_model(layer, torch.bfloat16, torch.bfloat16)
    assert isinstance(fi.decode_wrapper, FakeDecodeWrapper)
    for kv_dtype in (torch.float32, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="needs a float16 or bfloat16 KV cache"):
            fi.bind_model(layer, torch.float32, kv_dtype)
