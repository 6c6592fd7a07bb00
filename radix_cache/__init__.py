"""The prefix cache and the KV memory pools it indexes (imports torch only).

    PrefixCache (base.py): the interface and contract the scheduler uses (who locks, who frees)
    RadixCache (radix_cache.py): shares prefixes; ChunkCache (chunk_cache.py): shares nothing
"""

from loom.radix_cache.base import MatchResult, PrefixCache
from loom.radix_cache.chunk_cache import ChunkCache
from loom.radix_cache.memory_pool import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator
from loom.radix_cache.radix_cache import RadixCache, TreeNode

__all__ = [
    "ChunkCache",
    "MatchResult",
    "PrefixCache",
    "RadixCache",
    "ReqToTokenPool",
    "TokenToKVPool",
    "TokenToKVPoolAllocator",
    "TreeNode",
]
