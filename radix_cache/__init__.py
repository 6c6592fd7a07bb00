"""The prefix tree and the KV memory pools it indexes (imports torch only)."""

from loom.radix_cache.chunk_cache import ChunkCache
from loom.radix_cache.memory_pool import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator
from loom.radix_cache.radix_cache import MatchResult, RadixCache, TreeNode

__all__ = [
    "ChunkCache",
    "MatchResult",
    "RadixCache",
    "ReqToTokenPool",
    "TokenToKVPool",
    "TokenToKVPoolAllocator",
    "TreeNode",
]
