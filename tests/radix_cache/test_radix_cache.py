"""The radix tree: matching, splitting, locks, LRU eviction, request bookkeeping, a property test
against a flat reference model (every cached token = the prefix ending at it), and the
`PrefixCache` contract that the radix and chunk caches both keep, driven as the scheduler does."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from loom.radix_cache import ChunkCache, PrefixCache, RadixCache, TokenToKVPoolAllocator, TreeNode


def t(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def make(capacity: int = 32) -> tuple[RadixCache, TokenToKVPoolAllocator]:
    alloc = TokenToKVPoolAllocator(capacity)
    return RadixCache(None, alloc), alloc


def put(cache: RadixCache, alloc: TokenToKVPoolAllocator, key: list[int]) -> torch.Tensor:
    """Insert `key` the way a finished request would: fresh slots, duplicates freed."""
    slots = alloc.alloc(len(key))
    assert slots is not None
    already = cache.insert(key, slots)
    alloc.free(slots[:already])
    return slots


def tree_map(cache: RadixCache, holders: list[tuple[int, ...]] | None = None) -> dict[tuple[int, ...], int]:
    """Every cached token as {prefix ending at it: its slot}; checks the tree's structure, and
    with `holders` (the locked paths) that each node's lock_ref counts the paths covering it."""
    out: dict[tuple[int, ...], int] = {}
    stack: list[tuple[TreeNode, tuple[int, ...]]] = [(cache.root_node, ())]
    while stack:
        node, prefix = stack.pop()
        for first, child in node.children.items():
            assert child.parent is node and child.key and child.key[0] == first
            assert child.value is not None and child.value.numel() == len(child.key)
            assert node is cache.root_node or child.lock_ref <= node.lock_ref
            p = prefix
            for tok, slot in zip(child.key, child.value.tolist()):
                p += (tok,)
                out[p] = slot
            if holders is not None:
                assert child.lock_ref == sum(h[: len(p)] == p for h in holders), child
            stack.append((child, p))
    return out


# ---------------------------------------------------------------------------- unit tests
def test_match_on_empty_tree() -> None:
    cache, _ = make()
    res = cache.match_prefix([1, 2, 3])
    assert res.indices.dtype == torch.int64 and res.indices.numel() == 0
    assert res.last_node is cache.root_node
    assert cache.match_prefix([]).indices.numel() == 0


def test_insert_and_match_splits_node() -> None:
    cache, _ = make()
    assert cache.insert([1, 2, 3, 4], t(10, 11, 12, 13)) == 0
    res = cache.match_prefix([1, 2, 9])
    assert res.indices.tolist() == [10, 11]
    assert res.last_node.key == [1, 2] and list(res.last_node.children) == [3]
    assert res.last_node.children[3].key == [3, 4] and res.last_node.children[3].value.tolist() == [12, 13]
    assert cache.match_prefix([1, 2, 3, 4, 5]).indices.tolist() == [10, 11, 12, 13]
    assert cache.match_prefix([2]).indices.numel() == 0
    assert cache.total_size() == 4 == cache.evictable_size()


def test_insert_returns_already_cached_length() -> None:
    cache, _ = make()
    assert cache.insert([1, 2, 3], t(1, 2, 3)) == 0
    assert cache.insert([1, 2, 5, 6], t(7, 8, 4, 5)) == 2  # new part stored from value[2:]
    assert cache.match_prefix([1, 2, 5, 6]).indices.tolist() == [1, 2, 4, 5]
    assert cache.insert([1, 2], t(9, 9)) == 2
    assert cache.insert([1, 2, 3], t(9, 9, 9)) == 3
    assert cache.total_size() == 5


def test_lock_moves_tokens_between_evictable_and_protected() -> None:
    cache, alloc = make()
    put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 4, 5])
    node = cache.match_prefix([1, 2, 4, 5]).last_node
    cache.inc_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (1, 4)
    cache.lock(node)  # a second holder: sizes unchanged
    assert (cache.evictable_size(), cache.protected_size()) == (1, 4)
    cache.dec_lock_ref(node)
    assert (cache.evictable_size(), cache.protected_size()) == (1, 4)
    cache.unlock(node)
    assert (cache.evictable_size(), cache.protected_size()) == (5, 0)


def test_eviction_is_lru_over_unlocked_leaves() -> None:
    cache, alloc = make(8)
    a, b, c = put(cache, alloc, [1, 1]), put(cache, alloc, [2, 2]), put(cache, alloc, [3, 3])
    cache.match_prefix([1, 1])  # a is now the most recently used
    assert cache.evict(2) == 2
    assert sorted(alloc.free_slots().tolist()[-2:]) == sorted(b.tolist())
    assert cache.match_prefix([2, 2]).indices.numel() == 0
    assert cache.evict(1) == 2  # whole nodes go
    assert cache.match_prefix([3, 3]).indices.numel() == 0 and cache.match_prefix([1, 1]).indices.equal(a)
    assert alloc.available_size() == 6 and c.tolist()[0] in alloc.free_slots().tolist()


def test_locked_nodes_are_never_evicted() -> None:
    cache, alloc = make(8)
    a = put(cache, alloc, [1, 1])
    put(cache, alloc, [2, 2])
    cache.inc_lock_ref(cache.match_prefix([1, 1]).last_node)
    assert cache.evict(100) == 2
    assert (cache.evictable_size(), cache.protected_size()) == (0, 2)
    assert cache.match_prefix([1, 1]).indices.equal(a)
    assert alloc.available_size() == 6


def test_parent_becomes_evictable_after_its_children() -> None:
    cache, alloc = make()
    put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 4])
    assert cache.evict(2) == 2  # the two one-token leaves
    assert tree_map(cache).keys() == {(1,), (1, 2)}
    assert cache.evict(1) == 2 and cache.total_size() == 0
    put(cache, alloc, [1, 2, 3])
    put(cache, alloc, [1, 2, 4])
    assert cache.evict(4) == 4 and alloc.available_size() == 32  # in one call, via the heap


def test_reset_forgets_everything() -> None:
    cache, alloc = make()
    put(cache, alloc, [1, 2, 3])
    cache.inc_lock_ref(cache.match_prefix([1]).last_node)
    cache.reset()
    assert cache.total_size() == cache.evictable_size() == cache.protected_size() == 0
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 0


def test_cache_unfinished_and_finished_share_and_free_duplicates() -> None:
    cache, alloc = make(32)
    # Request A prefills [1, 2, 3, 4] and shares it.
    kv_a = alloc.alloc(4)
    idx_a, node_a = cache.cache_unfinished([1, 2, 3, 4], kv_a, 0, cache.root_node)
    assert idx_a.equal(kv_a) and (cache.evictable_size(), cache.protected_size()) == (0, 4)
    # Request B computed [1, 2, 3, 4, 5, 6] on its own slots meanwhile and finishes.
    kv_b = alloc.alloc(6)
    cache.cache_finished([1, 2, 3, 4, 5, 6], kv_b, 0, cache.root_node)
    assert set(kv_b[:4].tolist()) <= set(alloc.free_slots().tolist())  # duplicates freed
    assert cache.match_prefix([1, 2, 3, 4, 5, 6]).indices.tolist() == kv_a.tolist() + kv_b[4:].tolist()
    assert (cache.evictable_size(), cache.protected_size()) == (2, 4)
    # A decodes [5, 7]: slot of 5 duplicates B's, 7 is new.
    kv_a2 = torch.cat((idx_a, alloc.alloc(2)))
    outside = 2
    assert alloc.available_size() + cache.evictable_size() + cache.protected_size() + outside == 32
    cache.cache_finished([1, 2, 3, 4, 5, 7], kv_a2, 4, node_a)
    assert kv_a2[4].item() in alloc.free_slots().tolist()
    assert cache.match_prefix([1, 2, 3, 4, 5, 7]).indices.tolist() == kv_a.tolist() + [kv_b[4].item(), kv_a2[5].item()]
    assert (cache.evictable_size(), cache.protected_size()) == (7, 0)
    assert alloc.available_size() + cache.total_size() == 32
    assert sorted(alloc.free_slots().tolist() + list(tree_map(cache).values())) == list(range(1, 33))


@pytest.mark.parametrize("kind", ["chunk", "disabled"])
def test_chunk_cache_and_disabled_radix_share_nothing(kind: str) -> None:
    alloc = TokenToKVPoolAllocator(16)
    cache = ChunkCache(None, alloc) if kind == "chunk" else RadixCache(None, alloc, disable=True)
    res = cache.match_prefix([1, 2, 3])
    assert res.indices.numel() == 0 and res.indices.dtype == torch.int64
    kv = alloc.alloc(3)
    assert cache.insert([1, 2, 3], kv) == 0
    cache.inc_lock_ref(res.last_node)
    same, node = cache.cache_unfinished([1, 2, 3], kv, 0, res.last_node)
    assert same is kv and node is res.last_node and alloc.available_size() == 13
    assert cache.evict(10) == 0 and cache.evictable_size() == cache.protected_size() == 0
    cache.cache_finished([1, 2, 3], kv, 3, node)  # the request owned every slot
    assert alloc.available_size() == 16
    assert cache.match_prefix([1, 2, 3]).indices.numel() == 0


def test_simulation_tree_without_allocator() -> None:
    cache = RadixCache(None, None)
    cache.insert([1, 2, 3], torch.zeros(3, dtype=torch.int64))
    assert cache.match_prefix([1, 2, 4]).indices.numel() == 2
    assert cache.evict(5) == 3 and cache.total_size() == 0
    assert "root" in cache.pretty_print()


# ---------------------------------------------------------------------------- property test
keys = st.lists(st.integers(0, 3), max_size=12)


class RadixVsReference(RuleBasedStateMachine):
    """Drives the tree and a flat model side by side: `ref` maps every cached prefix to the
    slot of its last token, `ts` to the reference clock at its last access."""

    CAPACITY = 40

    def __init__(self) -> None:
        super().__init__()
        self.alloc = TokenToKVPoolAllocator(self.CAPACITY)
        self.cache = RadixCache(None, self.alloc)
        self.ref: dict[tuple[int, ...], int] = {}
        self.ts: dict[tuple[int, ...], int] = {}
        self.clock = 0
        self.locks: list[tuple[TreeNode, tuple[int, ...]]] = []  # standalone lock holders
        self.reqs: list[dict] = []  # running requests: tokens, kv, prefix_len, node

    # -- the reference ------------------------------------------------------
    def longest(self, key: list[int]) -> int:
        m = 0
        while m < len(key) and tuple(key[: m + 1]) in self.ref:
            m += 1
        return m

    def touch(self, key: list[int], m: int) -> None:
        if key:
            self.clock += 1
            for j in range(1, m + 1):
                self.ts[tuple(key[:j])] = self.clock

    def ref_insert(self, key: list[int], slots: torch.Tensor, prefix_len: int) -> None:
        """Mirror of insert + duplicate freeing; checks what the tree reported."""
        already = self.longest(key)
        self.touch(key, len(key))
        for j in range(already, len(key)):
            self.ref[tuple(key[: j + 1])] = int(slots[j])
        assert already >= prefix_len

    def match(self, key: list[int]) -> tuple[torch.Tensor, TreeNode]:
        idx, node = self.cache.match_prefix(key)
        m = self.longest(key)
        assert idx.tolist() == [self.ref[tuple(key[: j + 1])] for j in range(m)]
        self.touch(key, m)
        return idx, node

    def holders(self) -> list[tuple[int, ...]]:
        return [p for _, p in self.locks] + [tuple(r["tokens"][: r["prefix_len"]]) for r in self.reqs]

    def locked(self) -> set[tuple[int, ...]]:
        return {p[:j] for p in self.holders() for j in range(1, len(p) + 1)}

    def outside(self) -> list[int]:
        return [s for r in self.reqs for s in r["kv"][r["prefix_len"] :].tolist()]

    def make_room(self, n: int) -> bool:
        if n > self.alloc.available_size():
            self.evict_and_check(n - self.alloc.available_size())
        return n <= self.alloc.available_size()

    def evict_and_check(self, n: int) -> None:
        before, free_before = dict(self.ref), self.alloc.available_size()
        evictable_before, locked = self.cache.evictable_size(), self.locked()
        freed = self.cache.evict(n)
        after = tree_map(self.cache)
        removed = before.keys() - after.keys()
        assert after.items() <= before.items() and freed == len(removed)
        assert not removed & locked, "evicted a locked token"
        assert sorted(self.alloc.free_slots()[free_before:].tolist()) == sorted(before[p] for p in removed)
        assert freed >= min(n, evictable_before)
        if freed < n:
            assert self.cache.evictable_size() == 0
        leaves = [p for p in after if p not in locked and not any(p + (x,) in after for x in range(4))]
        if removed and leaves:
            assert max(self.ts[p] for p in removed) <= min(self.ts[p] for p in leaves), "not LRU"
        for p in removed:
            del self.ref[p], self.ts[p]

    # -- rules --------------------------------------------------------------
    @rule(key=keys)
    def insert(self, key: list[int]) -> None:
        if not self.make_room(len(key)):
            return
        slots = self.alloc.alloc(len(key))
        already = self.cache.insert(key, slots)
        assert already == self.longest(key)
        self.alloc.free(slots[:already])
        self.ref_insert(key, slots, 0)

    @rule(key=keys)
    def match_prefix(self, key: list[int]) -> None:
        idx, node = self.match(key)
        path, n = [], node
        while n is not self.cache.root_node:
            path[:0] = n.key
            n = n.parent
        assert path == key[: idx.numel()], "last_node must end exactly at the match"

    @rule(key=keys)
    def lock(self, key: list[int]) -> None:
        idx, node = self.match(key)
        self.cache.inc_lock_ref(node)
        self.locks.append((node, tuple(key[: idx.numel()])))

    @precondition(lambda self: self.locks)
    @rule(i=st.integers(0, 100))
    def unlock(self, i: int) -> None:
        node, _ = self.locks.pop(i % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(n=st.integers(0, 45))
    def evict(self, n: int) -> None:
        self.evict_and_check(n)

    @precondition(lambda self: len(self.reqs) < 3)
    @rule(key=keys)
    def req_start(self, key: list[int]) -> None:
        idx, node = self.match(key)
        self.cache.inc_lock_ref(node)
        self.reqs.append({"tokens": key[: idx.numel()], "kv": idx, "prefix_len": idx.numel(), "node": node})
        if self.make_room(len(key) - idx.numel()):
            self.reqs[-1]["tokens"] = key
            self.reqs[-1]["kv"] = torch.cat((idx, self.alloc.alloc(len(key) - idx.numel())))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), extra=keys)
    def req_extend(self, i: int, extra: list[int]) -> None:
        req = self.reqs[i % len(self.reqs)]
        if self.make_room(len(extra)):
            req["tokens"] = req["tokens"] + extra
            req["kv"] = torch.cat((req["kv"], self.alloc.alloc(len(extra))))

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100))
    def req_cache_unfinished(self, i: int) -> None:
        req = self.reqs[i % len(self.reqs)]
        tokens, kv, prefix_len = req["tokens"], req["kv"], req["prefix_len"]
        free_before = self.alloc.available_size()
        dup = kv[prefix_len : self.longest(tokens)].tolist()
        new_idx, new_node = self.cache.cache_unfinished(tokens, kv, prefix_len, req["node"])
        assert self.alloc.free_slots()[free_before:].tolist() == dup
        self.ref_insert(tokens, kv, prefix_len)
        self.touch(tokens, len(tokens))  # the re-match
        assert new_idx.tolist() == [self.ref[tuple(tokens[: j + 1])] for j in range(len(tokens))]
        assert new_idx[:prefix_len].equal(kv[:prefix_len])
        req.update(kv=new_idx, prefix_len=len(tokens), node=new_node)

    @precondition(lambda self: self.reqs)
    @rule(i=st.integers(0, 100), abort=st.booleans())
    def req_finish(self, i: int, abort: bool) -> None:
        req = self.reqs.pop(i % len(self.reqs))
        tokens, kv, prefix_len = req["tokens"], req["kv"], req["prefix_len"]
        if abort:  # retraction: free own slots, unlock the prefix
            self.alloc.free(kv[prefix_len:])
            self.cache.dec_lock_ref(req["node"])
            return
        free_before = self.alloc.available_size()
        dup = kv[prefix_len : self.longest(tokens)].tolist()
        self.cache.cache_finished(tokens, kv, prefix_len, req["node"])
        assert self.alloc.free_slots()[free_before:].tolist() == dup
        self.ref_insert(tokens, kv, prefix_len)

    # -- invariants ---------------------------------------------------------
    @invariant()
    def tree_matches_reference(self) -> None:
        assert tree_map(self.cache, self.holders()) == self.ref
        assert self.cache.protected_size() == len(self.locked())
        assert self.cache.evictable_size() + self.cache.protected_size() == self.cache.total_size() == len(self.ref)

    @invariant()
    def every_slot_has_one_owner(self) -> None:
        owners = self.alloc.free_slots().tolist() + list(self.ref.values()) + self.outside()
        assert sorted(owners) == list(range(1, self.CAPACITY + 1))
        assert self.alloc.available_size() + self.cache.evictable_size() + self.cache.protected_size() + len(
            self.outside()
        ) == self.CAPACITY


RadixVsReference.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_radix_vs_reference = RadixVsReference.TestCase


# ---------------------------------------------------------------------------- the PrefixCache contract
def test_prefix_cache_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        PrefixCache()  # type: ignore[abstract]


CACHES = {
    "radix": lambda alloc: RadixCache(None, alloc),
    "chunk": lambda alloc: ChunkCache(None, alloc),
    "disabled": lambda alloc: RadixCache(None, alloc, disable=True),
}
tokens = st.lists(st.integers(0, 3), min_size=1, max_size=10)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("start"), tokens),
        st.tuples(st.just("back_out"), tokens),  # admission locks, then finds no room and unlocks
        st.tuples(st.just("decode"), st.integers(0, 99), st.lists(st.integers(0, 3), min_size=1, max_size=3), st.booleans()),
        st.tuples(st.just("finish"), st.integers(0, 99), st.booleans()),
    ),
    max_size=25,
)


class ContractDriver:
    """Requests through the PrefixCache interface alone, as admission / batch_runner / output do
    it: match, lock, compute, `cache_unfinished`, decode, then `cache_finished` or (retraction)
    free own slots + `dec_lock_ref`. Checks the accounting of base.py after every operation."""

    CAPACITY = 24

    def __init__(self, kind: str) -> None:
        self.alloc = TokenToKVPoolAllocator(self.CAPACITY)
        self.cache: PrefixCache = CACHES[kind](self.alloc)
        self.reqs: list[dict] = []  # tokens, kv (the request's row), prefix_len, node

    def owned(self, req: dict) -> int:
        """Slots [0, owned) of the request's row belong to the cache."""
        return req["prefix_len"] if self.cache.shares_prefixes else 0

    def check(self) -> None:
        c = self.cache
        held = sum(r["kv"].numel() - self.owned(r) for r in self.reqs)
        assert self.alloc.available_size() + c.evictable_size() + c.protected_size() + held == self.CAPACITY
        assert c.evictable_size() + c.protected_size() == c.total_size()
        if not self.reqs:
            assert c.protected_size() == 0, "every lock was balanced by an unlock"
        if not c.shares_prefixes:
            assert c.total_size() == 0

    def make_room(self, n: int) -> bool:
        short = n - self.alloc.available_size()
        if short > 0:
            evictable = self.cache.evictable_size()
            assert self.cache.evict(short) >= min(short, evictable)
        return n <= self.alloc.available_size()

    def match_and_lock(self, key: list[int]) -> tuple[torch.Tensor, object]:
        idx, node = self.cache.match_prefix(key[: len(key) - 1])  # keep one token to compute
        assert idx.dtype == torch.int64 and idx.numel() <= len(key) - 1
        if not self.cache.shares_prefixes:
            assert idx.numel() == 0
        sizes = self.cache.evictable_size() + self.cache.protected_size()
        self.cache.inc_lock_ref(node)
        assert self.cache.evictable_size() + self.cache.protected_size() == sizes, "a lock moves tokens, frees none"
        assert self.cache.protected_size() >= idx.numel()
        return idx, node

    def start(self, key: list[int]) -> None:
        if len(self.reqs) >= 3:
            return
        idx, node = self.match_and_lock(key)
        if not self.make_room(len(key) - idx.numel()):  # eviction cannot touch the locked prefix
            self.cache.dec_lock_ref(node)
            return
        kv = torch.cat((idx, self.alloc.alloc(len(key) - idx.numel())))
        new_idx, new_node = self.cache.cache_unfinished(key, kv, idx.numel(), node)  # 0 unless it shares
        assert new_idx.numel() == len(key) and new_idx[: idx.numel()].equal(idx)
        self.reqs.append({"tokens": key, "kv": new_idx, "prefix_len": len(key), "node": new_node})

    def back_out(self, key: list[int]) -> None:
        before = (self.cache.evictable_size(), self.cache.protected_size())
        _, node = self.match_and_lock(key)
        self.cache.dec_lock_ref(node)
        assert (self.cache.evictable_size(), self.cache.protected_size()) == before

    def decode(self, i: int, extra: list[int], share: bool) -> None:
        if not self.reqs or not self.make_room(len(extra)):
            return
        req = self.reqs[i % len(self.reqs)]
        req["tokens"] = req["tokens"] + extra
        req["kv"] = torch.cat((req["kv"], self.alloc.alloc(len(extra))))
        if share:  # a chunked prefill's next chunk
            new_idx, new_node = self.cache.cache_unfinished(req["tokens"], req["kv"], self.owned(req), req["node"])
            assert new_idx.numel() == len(req["tokens"])
            req.update(kv=new_idx, prefix_len=len(req["tokens"]), node=new_node)

    def finish(self, i: int, abort: bool) -> None:
        if not self.reqs:
            return
        req = self.reqs.pop(i % len(self.reqs))
        if abort:  # retraction: the caller frees its own slots and unlocks
            self.alloc.free(req["kv"][self.owned(req) :])
            self.cache.dec_lock_ref(req["node"])
            return
        self.cache.cache_finished(req["tokens"], req["kv"], self.owned(req), req["node"])
        hit = self.cache.match_prefix(req["tokens"]).indices.numel()
        assert hit == (len(req["tokens"]) if self.cache.shares_prefixes else 0), "a finished request is a cache hit"


@pytest.mark.parametrize("kind", list(CACHES))
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(script=ops)
def test_every_prefix_cache_keeps_the_contract(kind: str, script: list[tuple]) -> None:
    driver = ContractDriver(kind)
    assert isinstance(driver.cache, PrefixCache) and driver.cache.shares_prefixes == (kind == "radix")
    for op, *args in script:
        getattr(driver, op)(*args)
        driver.check()
    while driver.reqs:
        driver.finish(0, abort=False)
        driver.check()
    # Nothing is locked, so everything cached is evictable, and evicting it all returns every slot.
    cache = driver.cache
    assert cache.protected_size() == 0 and cache.evictable_size() == cache.total_size()
    evictable = cache.evictable_size()
    assert cache.evict(driver.CAPACITY) == evictable and cache.total_size() == 0
    assert sorted(driver.alloc.free_slots().tolist()) == list(range(1, driver.CAPACITY + 1)), "a slot leaked"
