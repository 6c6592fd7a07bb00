"""Driving an attention backend as the model runner does, for the kernel tests: a scattered slot
table, and `Steps`, which feeds one layer's q/k/v through pools, slots and a ForwardBatch."""

from __future__ import annotations

import pytest
import torch

from loom.kernels.attention.base import AttentionLayer
from loom.radix_cache import ReqToTokenPool, TokenToKVPool
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

from triton_setup import DEVICE


def slot_table(lens: list[int], slots: int, gen: torch.Generator) -> torch.Tensor:
    """[len(lens) + 1, max_len] slots, rows in reverse order of the requests (row i+1 <- request i
    would be too regular), each request's slots scattered over the pool."""
    table = torch.zeros(len(lens) + 1, max(lens) + 3, dtype=torch.int64)
    perm = torch.randperm(slots - 1, generator=gen) + 1  # slot 0 is the pool's padding slot
    used = 0
    for i, n in enumerate(lens):
        table[len(lens) - i, :n] = perm[used : used + n]
        used += n
    return table.to(DEVICE)


class Steps:
    """Feeds one layer's q/k/v through a backend the way the model runner does (pools, slots, ForwardBatch)."""

    def __init__(self, backend, kv_heads: int, d: int, dtype: torch.dtype) -> None:
        self.backend = backend
        self.pool = TokenToKVPool(400, dtype, kv_heads, d, 1, DEVICE)
        self.req_pool = ReqToTokenPool(4, 128, DEVICE)
        self.next_slot, self.lens = 1, {}

    def run(self, rows: list[int], new: list[int], q, k, v, decode: bool = False) -> torch.Tensor:
        prefix = [self.lens.get(r, 0) for r in rows]
        locs = []
        for r, p, n in zip(rows, prefix, new):
            slots = torch.arange(self.next_slot, self.next_slot + n, device=DEVICE)
            self.next_slot += n
            self.req_pool.req_to_token[r, p : p + n] = slots
            self.lens[r] = p + n
            locs.append(slots)
        seq = [p + n for p, n in zip(prefix, new)]
        fb = ForwardBatch(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            batch_size=len(rows),
            input_ids=torch.zeros(sum(new), dtype=torch.int64, device=DEVICE),
            positions=torch.zeros(sum(new), dtype=torch.int64, device=DEVICE),
            out_cache_loc=torch.cat(locs),
            req_pool_indices=torch.tensor(rows, device=DEVICE),
            seq_lens=torch.tensor(seq, device=DEVICE),
            seq_lens_cpu=seq,
            extend_prefix_lens_cpu=[] if decode else prefix,
            extend_seq_lens_cpu=[] if decode else new,
            req_to_token_pool=self.req_pool,
            token_to_kv_pool=self.pool,
            attn_backend=self.backend,
        )
        self.backend.init_forward_metadata(fb)
        layer = AttentionLayer(0, q.shape[1], k.shape[1], q.shape[2], q.shape[2] ** -0.5)
        return self.backend.forward(q, k, v, layer, fb)


def assert_refuses_bfloat16(steps: Steps) -> None:
    """A prefill of 3 bf16 tokens (4 heads, 2 KV heads, D 64) on `steps` is refused under the interpreter."""
    q, k, v = torch.randn(3, 4, 64, dtype=torch.bfloat16), *torch.randn(2, 3, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not bfloat16"):
        steps.run([0], [3], q, k, v)
