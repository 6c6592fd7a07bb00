"""The cache used with `--disable-radix-cache`: a `PrefixCache` (base.py) that caches nothing.

Every request owns all of its KV slots; finishing frees them. Useful to measure what prefix
reuse buys, and for models or modes where sharing KV is not wanted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loom.radix_cache.base import MatchResult, PrefixCache
from loom.radix_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator
from loom.radix_cache.radix_cache import TreeNode


class ChunkCache(PrefixCache):
    """No prefix sharing: matches are always empty and nothing is ever evictable."""

    shares_prefixes = False

    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool | None,
        token_to_kv_pool_allocator: TokenToKVPoolAllocator | None,
    ) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.device = token_to_kv_pool_allocator.device if token_to_kv_pool_allocator is not None else torch.device("cpu")
        self.root_node = TreeNode()  # the dummy `last_node` of every match

    def reset(self) -> None:
        pass

    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        return MatchResult(torch.empty(0, dtype=torch.int64, device=self.device), self.root_node)

    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        return 0

    def inc_lock_ref(self, node: TreeNode) -> None:
        pass

    def dec_lock_ref(self, node: TreeNode) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def total_size(self) -> int:
        return 0

    def cache_finished(self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: TreeNode) -> None:
        """Free the request's slots. `prefix_len` is ignored: this cache owns no slots, so every
        slot in `kv_indices` is the request's own (even after `cache_unfinished`)."""
        if self.token_to_kv_pool_allocator is not None:
            self.token_to_kv_pool_allocator.free(kv_indices)

    def cache_unfinished(
        self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: TreeNode
    ) -> tuple[torch.Tensor, TreeNode]:
        """Nothing to share: the request keeps its slots -> (kv_indices, last_node) unchanged."""
        return kv_indices, last_node

    def pretty_print(self) -> str:
        return "ChunkCache (no prefix tree)"
