"""Which waiting requests go first: longest cached prefix first (lpm) or arrival order (fcfs).

In-batch prefix sharing: when several waiting requests share a prefix that is not cached yet,
admit one of them (the leader) and delay the others by a step; the leader's prefill inserts the
prefix into the radix tree, and the followers then reuse it instead of computing it again.
"""

from __future__ import annotations

import torch

from loom.radix_cache import PrefixCache, RadixCache
from loom.runtime.scheduler.schedule_batch import Req

# A follower waits only when the shared, uncached part is at least this long.
IN_BATCH_SHARING_MIN_TOKENS = 32
# Beyond this queue length lpm costs more than it saves (one tree walk per waiting request).
LPM_MAX_QUEUE = 256


class SchedulePolicy:
    def __init__(self, policy: str, tree_cache: PrefixCache, enable_in_batch_sharing: bool) -> None:
        self.policy = policy
        self.tree_cache = tree_cache
        # Delaying followers pays only when the leader's prefix is then served from the cache.
        self.enable_in_batch_sharing = enable_in_batch_sharing and tree_cache.shares_prefixes

    def match(self, req: Req) -> None:
        """Set req.prefix_indices / last_node to the longest usable cached prefix (not locked yet)."""
        key = req.fill_ids[: req.max_prefix_len()]
        indices, node = self.tree_cache.match_prefix(key)
        req.prefix_indices, req.last_node = indices, node

    def order(self, waiting: list[Req]) -> None:
        """Match every waiting request against the cache and sort the queue in place."""
        for req in waiting:
            self.match(req)
        if self.policy == "lpm" and len(waiting) <= LPM_MAX_QUEUE:
            # Stable sort: ties keep arrival order.
            waiting.sort(key=lambda r: -r.prefix_len)

    def new_round(self, in_flight: list[Req]) -> "InBatchPrefixTracker":
        tracker = InBatchPrefixTracker(self.enable_in_batch_sharing)
        for req in in_flight:
            tracker.add(req)
        return tracker


class InBatchPrefixTracker:
    """A token-only radix tree of what this round (and an in-progress chunked prefill) will compute."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tree = RadixCache(None, None) if enabled else None

    def should_delay(self, req: Req) -> bool:
        if not self.enabled:
            return False
        key = req.fill_ids[: req.max_prefix_len()]
        shared = self.tree.match_prefix(key).indices.numel()
        return shared - req.prefix_len >= IN_BATCH_SHARING_MIN_TOKENS

    def add(self, req: Req) -> None:
        if self.enabled:
            key = req.fill_ids
            self.tree.insert(key, torch.zeros(len(key), dtype=torch.int64))
