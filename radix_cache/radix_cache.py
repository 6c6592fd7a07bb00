"""The prefix tree over token ids whose nodes own KV slots (page size 1): a `PrefixCache` (base.py,
which states the contract: who locks, who frees) that shares prefixes.

Ownership: every KV slot handed out by the allocator is in exactly one place: the allocator's
free list, a tree node (evictable when no request locks its path, protected otherwise), or a
running request (slots it computed that are not in the tree yet). A request that uses a cached
prefix locks the node where its match ends (`inc_lock_ref`) before using the indices and
unlocks it when done; `cache_finished` / `cache_unfinished` move its own slots into the tree.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence

import torch

from loom.radix_cache.base import MatchResult, PrefixCache
from loom.radix_cache.memory_pool import ReqToTokenPool, TokenToKVPoolAllocator

_node_ids = itertools.count()


class TreeNode:
    """One edge of the tree: `key` tokens and their KV slots `value` (same length)."""

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access_time", "id")

    def __init__(self, key: list[int] | None = None, value: torch.Tensor | None = None, parent: TreeNode | None = None) -> None:
        self.children: dict[int, TreeNode] = {}  # keyed by the child's first token
        self.parent = parent
        self.key: list[int] = key if key is not None else []
        self.value = value  # int64 [len(key)]; None on the root
        self.lock_ref = 0  # requests whose locked path runs through this node
        self.last_access_time = 0  # the cache's operation counter at the last match/insert through here
        self.id = next(_node_ids)  # heap tie-break

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, key={self.key}, lock_ref={self.lock_ref}, t={self.last_access_time})"


def _as_list(key: Sequence[int] | torch.Tensor) -> Sequence[int]:
    # Tensor elements hash by identity, so a tensor key would never match a child.
    return key.tolist() if isinstance(key, torch.Tensor) else key


def _common_prefix_len(a: list[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache(PrefixCache):
    """A radix tree of token sequences -> KV slots, with LRU eviction of unlocked leaves.

    With `token_to_kv_pool_allocator=None` it is a simulation tree: values may be any tensor of
    the key's length and eviction drops nodes without freeing anything. With `disable=True` it
    caches nothing and behaves like `ChunkCache`.
    """

    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool | None,
        token_to_kv_pool_allocator: TokenToKVPoolAllocator | None,
        disable: bool = False,
    ) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.disable = disable
        self.device = token_to_kv_pool_allocator.device if token_to_kv_pool_allocator is not None else torch.device("cpu")
        self.reset()

    @property
    def shares_prefixes(self) -> bool:
        return not self.disable

    def reset(self) -> None:
        """Forget every node (without freeing slots: the caller clears the allocator too)."""
        self.root_node = TreeNode()
        self.root_node.lock_ref = 1  # the root is never evictable
        self._evictable_size = 0
        self._protected_size = 0
        self._clock = 0

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self.device)

    def _tick(self) -> int:
        # One tick per operation: every node touched by one match/insert shares its time, so a
        # parent is never older than its children and LRU order matches token-level recency.
        self._clock += 1
        return self._clock

    # ------------------------------------------------------------------ lookup
    def match_prefix(self, key: Sequence[int]) -> MatchResult:
        """Longest cached prefix of `key` -> (its KV slots, the node where it ends).

        A match that ends inside a node splits it so `last_node` ends exactly at the match.
        Refreshes the access time of the matched path. Does not lock anything.
        """
        if self.disable or len(key) == 0:
            return MatchResult(self._empty(), self.root_node)
        key = _as_list(key)
        node, _, values = self._walk(key, self._tick())
        indices = torch.cat(values) if values else self._empty()
        return MatchResult(indices, node)

    def _walk(self, key: Sequence[int], now: int) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Follow `key` from the root, splitting the last node on a partial match, marking the
        path as used at `now` -> (node where the match ends, matched length, slot tensors)."""
        node = self.root_node
        node.last_access_time = now
        values: list[torch.Tensor] = []
        pos = 0
        while pos < len(key) and key[pos] in node.children:
            child = node.children[key[pos]]
            n = _common_prefix_len(child.key, key[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split_node(child, n)
            child.last_access_time = now
            values.append(child.value)
            node = child
            pos += n  # after a split key[pos] differs from node's only child: the loop ends
        return node, pos, values

    def _split_node(self, child: TreeNode, split_len: int) -> TreeNode:
        """Cut `child` after `split_len` tokens; returns the new upper half (now child's parent)."""
        assert 0 < split_len < len(child.key)
        parent = child.parent
        assert parent is not None
        upper = TreeNode(child.key[:split_len], child.value[:split_len], parent)
        upper.lock_ref = child.lock_ref  # every locked path through child runs through upper
        upper.last_access_time = child.last_access_time
        child.key, child.value = child.key[split_len:], child.value[split_len:]
        child.parent = upper
        upper.children[child.key[0]] = child
        parent.children[upper.key[0]] = upper
        return upper

    # ------------------------------------------------------------------ insert
    def insert(self, key: Sequence[int], value: torch.Tensor) -> int:
        """Add `key` with KV slots `value` [len(key)] -> length of the prefix ALREADY cached.

        The tree keeps its own slots for that prefix; the caller frees its duplicates
        `value[prefix_len_before:returned]`. The new part is stored as `value[returned:]`.
        """
        if self.disable:
            return 0
        assert value.numel() == len(key), f"insert: {len(key)} tokens but {value.numel()} slots"
        if len(key) == 0:
            return 0
        key = _as_list(key)
        now = self._tick()
        node, pos, _ = self._walk(key, now)
        if pos < len(key):
            new = TreeNode(list(key[pos:]), value[pos:].clone(), node)
            new.last_access_time = now
            node.children[key[pos]] = new
            self._evictable_size += len(new.key)
        return pos

    # ------------------------------------------------------------------ locks
    def inc_lock_ref(self, node: TreeNode) -> None:
        """Lock the path root..node: its tokens move from evictable to protected."""
        if self.disable:
            return
        while node is not self.root_node:
            if node.lock_ref == 0:
                self._evictable_size -= len(node.key)
                self._protected_size += len(node.key)
            node.lock_ref += 1
            assert node.parent is not None, "inc_lock_ref on a node that is no longer in the tree"
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Unlock the path root..node locked by a matching `inc_lock_ref`."""
        if self.disable:
            return
        while node is not self.root_node:
            assert node.lock_ref > 0, f"dec_lock_ref below zero on {node!r}"
            if node.lock_ref == 1:
                self._evictable_size += len(node.key)
                self._protected_size -= len(node.key)
            node.lock_ref -= 1
            assert node.parent is not None, "dec_lock_ref on a node that is no longer in the tree"
            node = node.parent

    # ------------------------------------------------------------------ eviction
    def evict(self, num_tokens: int) -> int:
        """Free least-recently-used unlocked leaves until >= num_tokens are freed or nothing is
        evictable -> tokens freed (whole nodes go, so it may exceed num_tokens)."""
        if self.disable or num_tokens <= 0:
            return 0
        heap = [(n.last_access_time, n.id, n) for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            if self.token_to_kv_pool_allocator is not None:
                self.token_to_kv_pool_allocator.free(leaf.value)
            freed += len(leaf.key)
            self._evictable_size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            leaf.parent = None
            if parent is not self.root_node and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access_time, parent.id, parent))
        return freed

    def _leaves(self) -> list[TreeNode]:
        out, stack = [], [self.root_node]
        while stack:
            node = stack.pop()
            if not node.children and node is not self.root_node:
                out.append(node)
            stack.extend(node.children.values())
        return out

    # ------------------------------------------------------------------ sizes
    def evictable_size(self) -> int:
        """Tokens in the tree that no request locks."""
        return self._evictable_size

    def protected_size(self) -> int:
        """Tokens in the tree on some request's locked path."""
        return self._protected_size

    def total_size(self) -> int:
        """Tokens stored in the tree (walks it; for checks, not the hot path)."""
        total, stack = 0, [self.root_node]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    # ------------------------------------------------------------------ request bookkeeping
    def cache_finished(self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: TreeNode) -> None:
        """A request is done: hand its slots to the tree and unlock its prefix.

        `kv_indices` [len(token_ids)]: its slots; the first `prefix_len` came from the tree
        (locked via `last_node`). Duplicates of what someone else inserted meanwhile are freed.
        The request's ReqToTokenPool row is freed by the caller.
        """
        if self.disable:
            self._free(kv_indices)  # nothing is in the tree: every slot is the request's own
            return
        already = self.insert(token_ids, kv_indices)
        assert already >= prefix_len, f"the locked prefix ({prefix_len}) left the tree (only {already} cached)"
        self._free(kv_indices[prefix_len:already])
        self.dec_lock_ref(last_node)

    def cache_unfinished(
        self, token_ids: Sequence[int], kv_indices: torch.Tensor, prefix_len: int, last_node: TreeNode
    ) -> tuple[torch.Tensor, TreeNode]:
        """A running request shares what it has so far -> (new_indices, new_last_node).

        Inserts, frees duplicates as `cache_finished` does, then locks the node ending at
        `token_ids` and unlocks `last_node`. `new_indices` [len(token_ids)] are the slots the tree
        now owns for those tokens; the caller writes them into its row and sets
        prefix_len = len(token_ids).
        """
        if self.disable:
            return kv_indices, last_node
        already = self.insert(token_ids, kv_indices)
        assert already >= prefix_len, f"the locked prefix ({prefix_len}) left the tree (only {already} cached)"
        self._free(kv_indices[prefix_len:already])
        new_indices, new_node = self.match_prefix(token_ids)
        assert new_indices.numel() == len(token_ids), "a just-inserted sequence must match in full"
        self.inc_lock_ref(new_node)
        self.dec_lock_ref(last_node)
        return new_indices, new_node

    def _free(self, indices: torch.Tensor) -> None:
        if self.token_to_kv_pool_allocator is not None:
            self.token_to_kv_pool_allocator.free(indices)

    # ------------------------------------------------------------------ debug
    def pretty_print(self) -> str:
        """The tree as indented text: one line per node with its tokens, lock count and time."""
        lines = [f"root (evictable={self._evictable_size}, protected={self._protected_size})"]
        stack: list[tuple[TreeNode, int]] = [(c, 1) for c in reversed(list(self.root_node.children.values()))]
        while stack:
            node, depth = stack.pop()
            lines.append(f"{'  ' * depth}{node.key} lock={node.lock_ref} t={node.last_access_time}")
            stack.extend((c, depth + 1) for c in reversed(list(node.children.values())))
        return "\n".join(lines)
