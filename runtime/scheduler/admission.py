"""Admission and retraction: which waiting requests join the next prefill (extend) batch, and
which running ones give their memory back when a decode step would not fit.

Future-token reservation (as SGLang): new requests are admitted only while the running ones keep
room for `new_token_ratio` of their remaining max_new_tokens; the ratio decays while nothing is
retracted and jumps back up after a retraction. The waiting queue is ordered by the policy
(`schedule_policy.py`: longest cached prefix first, or arrival order); long prompts are split into
chunks of `chunked_prefill_size` tokens (`chunked_req` carries the one in progress).
"""

from __future__ import annotations

import logging

import torch

from loom.runtime.scheduler.schedule_batch import ExtendPlan, Req, build_extend_batch

logger = logging.getLogger(__name__)

# Future-token reservation: see the module docstring.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RESERVE_CLIP = 4096


class PrefillAdmission:
    """The Scheduler's admission and retraction (a mixin: it reads and writes the scheduler's
    queues, pools, radix cache and stats)."""

    def get_new_prefill_batch(self) -> ExtendPlan | None:
        if not self.waiting and self.chunked_req is None:
            return None
        in_flight = [self.chunked_req] if self.chunked_req else []
        if self.waiting:
            self.policy.order(self.waiting)
        tracker = self.policy.new_round(in_flight)

        rem_chunk = min(self.chunk_size, self.args.max_prefill_tokens)
        physical = self.allocator.available_size() + self.tree_cache.evictable_size()
        batch: list[Req] = []
        new_reqs: list[Req] = []

        if self.chunked_req is not None:
            # A started prefill continues first, on whatever memory is physically there.
            req = self.chunked_req
            req.extend_input_len = min(req.fill_len - req.kv_len, rem_chunk, physical)
            if req.extend_input_len <= 0:
                return None  # decode until running requests give memory back
            req.is_chunked = req.kv_len + req.extend_input_len < req.fill_len
            rem_chunk -= req.extend_input_len
            physical -= req.extend_input_len
            batch.append(req)
        rem_tokens = physical - sum(self._reserve(r) for r in self.running)

        for req in self.waiting:
            if rem_chunk <= 0 or (batch and batch[-1].is_chunked):
                break
            if len(self.running) + len(batch) >= self.max_running:
                break
            if tracker.should_delay(req):
                continue
            extend = req.fill_len - req.prefix_len
            reserve = self._reserve(req)
            if extend + reserve > rem_tokens and (batch or self.running):
                break  # no room now; retry when memory frees up
            evictable_before = self.tree_cache.evictable_size()
            self.tree_cache.inc_lock_ref(req.last_node)
            rem_tokens -= evictable_before - self.tree_cache.evictable_size()
            budget = min(rem_chunk, max(rem_tokens, 0))
            if extend > budget:
                if budget <= 0:
                    self.tree_cache.dec_lock_ref(req.last_node)
                    break
                extend = budget
            req.extend_input_len = extend
            req.is_chunked = req.prefix_len + extend < req.fill_len
            rem_chunk -= extend
            rem_tokens -= extend + reserve
            batch.append(req)
            new_reqs.append(req)
            tracker.add(req)

        if not batch:
            return None
        admitted = set(map(id, new_reqs))
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        for req in new_reqs:
            if not req.admitted_once:
                req.admitted_once = True
                req.cached_tokens = req.prefix_len
                self.stats["prompt_tokens"] += req.prompt_len
                self.stats["cached_tokens"] += req.prefix_len
            req.req_pool_idx = self._alloc_row()
        n_extend = sum(r.extend_input_len for r in batch)
        self.stats["extend_tokens"] += n_extend
        out_cache_loc = self._alloc_slots(n_extend)
        assert out_cache_loc is not None, "admission promised memory that eviction could not free"
        return build_extend_batch(batch, out_cache_loc, self.req_to_token_pool.req_to_token, device=self.batch_device)

    def _reserve(self, req: Req) -> int:
        return int(min(req.remaining_new_tokens, RESERVE_CLIP) * self.new_token_ratio)

    def _alloc_row(self) -> int:
        rows = self.req_to_token_pool.alloc(1)
        assert rows is not None, "req_to_token_pool has a row for every admitted request by construction"
        return rows[0]

    def _alloc_slots(self, n: int) -> torch.Tensor | None:
        if n > self.allocator.available_size():
            self.tree_cache.evict(n - self.allocator.available_size())
        return self.allocator.alloc(n)

    def prepare_decode(self) -> None:
        """Make room for the new tokens of every running request (one each, more after a
        jump-forward): evict, then retract if still short."""
        self.new_token_ratio = max(self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, MIN_NEW_TOKEN_RATIO)
        need = sum(r.pending_len for r in self.running)
        if need > self.allocator.available_size():
            self.tree_cache.evict(need - self.allocator.available_size())
        if need <= self.allocator.available_size():
            return
        # Retract the requests with the fewest outputs (cheapest to redo) until the rest fit.
        self.running.sort(key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)), reverse=True)
        retracted: list[Req] = []
        while len(self.running) > 1 and need > self.allocator.available_size():
            req = self.running.pop()
            need -= req.pending_len
            self.release(req, cache=False)
            req.reset_for_retract()
            retracted.append(req)
            self.tree_cache.evict(max(need - self.allocator.available_size(), 0))
        if need > self.allocator.available_size():
            req = self.running.pop()
            self.finish(req, {"type": "abort", "message": "out of KV cache memory: the request outgrew the whole pool"})
        if retracted:
            self.stats["retracted"] += len(retracted)
            logger.info("KV cache full: retracted %d request(s) back to the queue", len(retracted))
            self.waiting = retracted[::-1] + self.waiting
            total_max = sum(r.sampling_params.max_new_tokens for r in self.running) or 1
            decoded = sum(len(r.output_ids) for r in self.running)
            self.new_token_ratio = min(1.0, max(self.new_token_ratio, (decoded + 50 * len(self.running)) / total_max))
