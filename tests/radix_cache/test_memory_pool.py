"""KV memory pools: request rows, slot allocation, K/V buffers and their sizing."""

from __future__ import annotations

import pathlib

import pytest
import torch

from loom.radix_cache import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator


def test_req_to_token_pool_rows_round_trip() -> None:
    pool = ReqToTokenPool(4, 16)
    assert pool.req_to_token.shape == (4, 16) and pool.req_to_token.dtype == torch.int64
    rows = pool.alloc(3)
    assert rows is not None and len(set(rows)) == 3 and all(0 <= r < 4 for r in rows)
    assert pool.available_size() == 1
    assert pool.alloc(2) is None and pool.available_size() == 1  # nothing taken on failure
    pool.free(rows[0])
    pool.free(rows[1:])
    assert pool.available_size() == 4
    again = pool.alloc(4)
    assert again is not None and sorted(again) == [0, 1, 2, 3]
    pool.clear()
    assert pool.available_size() == 4


def test_allocator_round_trip_and_reserved_slot() -> None:
    alloc = TokenToKVPoolAllocator(10)
    a = alloc.alloc(4)
    b = alloc.alloc(6)
    assert a is not None and b is not None
    assert a.dtype == torch.int64 and a.shape == (4,)
    got = torch.cat((a, b))
    assert sorted(got.tolist()) == list(range(1, 11))  # slot 0 is never handed out
    assert alloc.available_size() == 0
    alloc.free(a)
    assert alloc.available_size() == 4
    assert sorted(alloc.free_slots().tolist()) == sorted(a.tolist())
    alloc.free(torch.empty(0, dtype=torch.int64))
    assert alloc.available_size() == 4
    alloc.clear()
    assert alloc.available_size() == 10 and sorted(alloc.free_slots().tolist()) == list(range(1, 11))


def test_allocator_beyond_capacity_takes_nothing() -> None:
    alloc = TokenToKVPoolAllocator(5)
    assert alloc.alloc(6) is None
    assert alloc.available_size() == 5
    first = alloc.alloc(3)
    assert first is not None
    assert alloc.alloc(3) is None and alloc.available_size() == 2
    assert alloc.alloc(0) is not None and alloc.alloc(0).numel() == 0


def test_allocator_reuses_freed_slots_without_duplicates() -> None:
    alloc = TokenToKVPoolAllocator(8)
    held: list[int] = []
    gen = torch.Generator().manual_seed(0)
    for step in range(200):
        if held and (step % 3 == 0 or alloc.available_size() == 0):
            k = int(torch.randint(1, len(held) + 1, (1,), generator=gen))
            alloc.free(torch.tensor(held[:k]))
            held = held[k:]
        else:
            n = int(torch.randint(1, alloc.available_size() + 1, (1,), generator=gen))
            got = alloc.alloc(n)
            assert got is not None
            held += got.tolist()
        free = alloc.free_slots().tolist()
        assert sorted(free + held) == list(range(1, 9)), "every slot is either free or held, once"


def test_kv_pool_shapes_and_set_kv_buffer_writes_rows() -> None:
    pool = TokenToKVPool(6, torch.float16, head_num=2, head_dim=4, layer_num=3)
    assert len(pool.k_buffer) == len(pool.v_buffer) == 3
    assert pool.get_key_buffer(0).shape == (7, 2, 4) and pool.get_value_buffer(2).dtype == torch.float16
    loc = torch.tensor([5, 2])
    k = torch.arange(16, dtype=torch.float32).reshape(2, 2, 4)
    v = -k
    pool.set_kv_buffer(1, loc, k, v)
    k_buf, v_buf = pool.get_kv_buffer(1)
    assert torch.equal(k_buf[5], k[0].half()) and torch.equal(k_buf[2], k[1].half())
    assert torch.equal(v_buf[loc], v.half())
    untouched = [i for i in range(7) if i not in (2, 5)]
    assert not k_buf[untouched].any() and not v_buf[untouched].any()
    assert not pool.get_key_buffer(0).any() and not pool.get_key_buffer(2).any()  # other layers untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bytes_per_token_and_size_for_budget(dtype: torch.dtype) -> None:
    itemsize = 4 if dtype == torch.float32 else 2
    per_token = TokenToKVPool.bytes_per_token(dtype, 2, 8, 3)
    assert per_token == 2 * 2 * 8 * 3 * itemsize
    budget = per_token * 100 + per_token // 2
    size = TokenToKVPool.size_for_budget(budget, dtype, 2, 8, 3)
    pool = TokenToKVPool(size, dtype, 2, 8, 3)
    assert pool.mem_bytes() <= budget < pool.mem_bytes() + per_token  # the reserved row counts
    assert pool.mem_bytes() == (size + 1) * per_token
    assert TokenToKVPool.size_for_budget(per_token // 2, dtype, 2, 8, 3) == 0


def _pool_resident_kib() -> int:
    """Resident KiB of this process's don't-dump maps (the CPU KV pools), from /proc/self/smaps."""
    total, rss = 0, 0
    for line in pathlib.Path("/proc/self/smaps").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("VmFlags:") and " dd" in line:
            total += rss
    return total


@pytest.mark.skipif(not pathlib.Path("/proc/self/smaps").exists(), reason="reads /proc/self/smaps (Linux)")
def test_release_pages_gives_the_memory_back_and_slots_read_zero() -> None:
    before = _pool_resident_kib()
    pool = TokenToKVPool(4096, torch.float32, 4, 64, 2)  # 4 buffers of 4 MiB, none resident yet
    assert _pool_resident_kib() - before < 64
    for layer in range(2):
        pool.set_kv_buffer(layer, torch.arange(1, 4097), torch.ones(4096, 4, 64), torch.ones(4096, 4, 64))
    assert _pool_resident_kib() - before >= 16 * 1024 - 64  # every page written is resident
    pool.release_pages()
    assert _pool_resident_kib() - before < 64
    assert not any(b.any() for b in pool.k_buffer + pool.v_buffer)  # a released slot reads zero
    pool.set_kv_buffer(1, torch.tensor([7]), torch.full((1, 4, 64), 2.0), torch.full((1, 4, 64), 3.0))
    assert pool.get_key_buffer(1)[7].eq(2.0).all() and pool.get_value_buffer(1)[7].eq(3.0).all()  # and takes writes again
