"""The prefix cache the scheduler talks to: `PrefixCache`, with the contract every cache keeps.

    RadixCache (radix_cache.py): shares prefixes between requests; nodes own KV slots.
    ChunkCache (chunk_cache.py, `--disable-radix-cache`): shares nothing; requests own every slot.

Ownership: every KV slot handed out by the allocator is in exactly one place: the allocator's free
list, the cache (evictable when no request locks it, protected otherwise), or a running request.
So after every scheduler step

    allocator.available_size() + evictable_size() + protected_size() + held == capacity

where a request holds `kv_len - prefix_len` slots when the cache `shares_prefixes` (the first
`prefix_len` are the cache's, locked through `last_node`) and all `kv_len` when it does not.

Threads: the scheduler thread alone calls these methods. None reads or writes KV itself, only slot
indices and the allocator's free list, so every method is safe while an overlapped decode step
runs on the forward thread: that step reads locked prefixes (never evicted) and writes only slots
its requests hold, which the cache never gets before the step is processed (`release`, in
runtime/scheduler/output.py, hands those to the allocator, not to the cache).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch


class MatchResult(NamedTuple):
    indices: torch.Tensor  # int64 [n] KV slots of the matched prefix; empty when nothing matched
    last_node: Any  # the cache's handle on where the match ends: lock it before using `indices`


class PrefixCache(abc.ABC):
    """A cache of token-sequence prefixes -> KV slots, and the request bookkeeping around it.

    A request's life, as the scheduler drives it (admission.py, batch_runner.py, output.py):

        match_prefix(prompt)            -> (prefix slots, last_node); nothing locked yet
        inc_lock_ref(last_node)         the request now relies on the prefix: it cannot be evicted
        ... compute KV for the rest on slots from the allocator ...
        cache_unfinished(...)           after each extend: share the progress, the lock moves on
        cache_finished(...)             done: the cache takes every slot and unlocks
      or dec_lock_ref(last_node)        retracted / aborted without caching: the caller frees
                                        its own slots (see `shares_prefixes`) and unlocks

    Each `inc_lock_ref` is balanced by exactly one `dec_lock_ref`, `cache_finished`, or
    `cache_unfinished` (which unlocks the old node and locks the new one on the caller's behalf).
    """

    req_to_token_pool: Any  # ReqToTokenPool | None; the caller allocates and frees its rows
    token_to_kv_pool_allocator: Any  # TokenToKVPoolAllocator | None (None: a simulation, nothing is freed)

    @property
    @abc.abstractmethod
    def shares_prefixes(self) -> bool:
        """Whether the cache keeps KV of finished and running requests and hands it to others.

        True: a match may be non-empty, and a request's slots [0, prefix_len) belong to the cache
        (locked through `last_node`): the request holds only [prefix_len, kv_len), and freeing it
        without caching frees just those. False: every match is empty, nothing is evictable or
        protected, and the `indices` that `cache_unfinished` hands back are the request's own
        slots, so a request holds all of [0, kv_len) whatever its prefix_len says. In-batch
        prefix sharing (schedule_policy.py) needs True: with False nobody reuses the leader's KV."""

    # ------------------------------------------------------------------ lookup
    @abc.abstractmethod
    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """The longest cached prefix of `key` -> (its KV slots [n], the node where it ends).

        Locks nothing and frees nothing: the slots stay valid only until the next `evict`, unless
        the caller locks `last_node` first. May reshape the cache's structure (a radix node is
        split where the match ends) without changing any slot, lock or size; handles locked
        before stay valid. An empty key, or nothing cached, gives empty indices and a node that
        locks nothing."""

    @abc.abstractmethod
    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Store `key` with its KV slots `value` [len(key)] -> how many leading tokens were cached
        already.

        The cache keeps its own slots for those and takes `value[returned:]`; the caller frees its
        duplicates among `value[:returned]` (those it does not share from the cache). A cache that
        does not share prefixes stores nothing and returns 0: the caller keeps every slot. Locks
        nothing; what is inserted is evictable until locked."""

    # ------------------------------------------------------------------ locks
    @abc.abstractmethod
    def inc_lock_ref(self, node: Any) -> None:
        """Lock the prefix ending at `node` (a `last_node` from this cache): it cannot be evicted,
        and its tokens move from `evictable_size` to `protected_size` (not again for a second
        holder). The caller that locks owes exactly one unlock (see the class docstring)."""

    @abc.abstractmethod
    def dec_lock_ref(self, node: Any) -> None:
        """Undo one `inc_lock_ref(node)`. Frees nothing: the tokens become evictable again once no
        lock covers them. Unlocking more often than locking is an internal error."""

    def lock(self, node: Any) -> None:
        """`inc_lock_ref`."""
        self.inc_lock_ref(node)

    def unlock(self, node: Any) -> None:
        """`dec_lock_ref`."""
        self.dec_lock_ref(node)

    # ------------------------------------------------------------------ eviction and sizes
    @abc.abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free cached, unlocked KV (least recently used first) until at least `num_tokens` slots
        went back to the allocator, or nothing evictable is left -> tokens freed (may exceed
        `num_tokens`: whole nodes go). The cache frees; locked prefixes and slots requests hold are
        never touched, so the scheduler calls it whenever an allocation falls short."""

    @abc.abstractmethod
    def evictable_size(self) -> int:
        """Tokens the cache owns that no lock covers: what `evict` could free now."""

    @abc.abstractmethod
    def protected_size(self) -> int:
        """Tokens the cache owns on some locked prefix."""

    @abc.abstractmethod
    def total_size(self) -> int:
        """Tokens the cache owns: evictable_size() + protected_size() (may walk the cache: for
        checks, not the hot path)."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything cached, without freeing any slot: the caller clears the allocator and
        the req_to_token pool too, and only when no request holds a lock (flush_cache)."""

    # ------------------------------------------------------------------ request bookkeeping
    @abc.abstractmethod
    def cache_finished(self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: Any) -> None:
        """A request is done: the cache takes all of `kv_indices` [len(token_ids)] and unlocks
        `last_node`.

        `prefix_len`: how many leading slots the request got from the cache (locked through
        `last_node`; 0 when the cache does not share prefixes, whatever the request's own
        bookkeeping says). The cache stores what it shares and frees the rest (duplicates of
        what another request cached meanwhile; everything, when it shares nothing). The caller
        must not use `kv_indices` afterwards, and frees the request's req_to_token row itself."""

    @abc.abstractmethod
    def cache_unfinished(
        self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: Any
    ) -> tuple[torch.Tensor, Any]:
        """A running request shares the KV it has so far -> (new_indices, new_last_node).

        `kv_indices` [len(token_ids)]: its slots; the first `prefix_len` came from the cache
        (locked through `last_node`). Duplicates are freed as in `cache_finished`; then
        `new_last_node` is locked and `last_node` unlocked, so the request still holds one lock.
        The caller writes `new_indices` [len(token_ids)] into its row and makes them its prefix
        (prefix_indices / last_node). With `shares_prefixes` those slots are now the cache's;
        without, the cache returns (kv_indices, last_node) unchanged and the request keeps them."""

    # ------------------------------------------------------------------ debug
    @abc.abstractmethod
    def pretty_print(self) -> str:
        """The cache as text, for logs and failing tests."""
