"""Overlap scheduling, the scheduler's side (`overlap.py` holds the forward thread): a decode step
is launched on the forward thread and the step launched before it is processed (tokens appended,
finish checks, stop strings, streaming output) while it runs, so step N+1 never waits for step
N's tokens on the host: its inputs are future refs that the forward thread resolves on the
device. Consequences, all handled here and in `output.py`:
  - a request that finishes when step N is processed may already be in step N+1; that token is
    dropped and its slot freed (`release`); an abort may likewise land while a step runs;
  - a request whose launched steps reach max_new_tokens / the context length is not launched again;
  - min_new_tokens bans count the tokens still in flight.
What overlaps: decode steps of requests without grammar, logprobs or penalties (frequency,
presence, repetition), with the memory for one more token each. Everything else runs
synchronously after draining the launched step: prefill / extend batches (also whenever requests
wait or a chunked prefill continues: they may reuse req_to_token rows a running step reads),
grammar requests (their mask needs the previous token accepted; jump-forward comes with them),
logprobs, penalties (they read output ids on the host), retraction (prepare_decode) and tensor
parallelism (its sampling is a collective on this thread). A batch goes one way or the other whole.
"""

from __future__ import annotations

import logging

from loom.runtime.scheduler.admission import MIN_NEW_TOKEN_RATIO, NEW_TOKEN_RATIO_DECAY
from loom.runtime.scheduler.overlap import DecodeSampling, FutureTokenMap, InflightStep, overlap_supported
from loom.runtime.scheduler.schedule_batch import Req, build_decode_batch

logger = logging.getLogger(__name__)

class OverlapScheduling:
    """The Scheduler's overlapped decode steps (a mixin over the scheduler's state)."""

    def overlap_decode(self) -> bool:
        """Launch the next decode step on the forward thread, then process the step before it
        while this one runs. False (nothing done) when the batch needs the synchronous path."""
        if self.waiting or self.chunked_req:
            return False  # an extend comes first, and it may reuse rows a running step reads
        # A request whose launched steps already reach its length limit finishes when they are
        # processed: launching it again would only compute a token to throw away.
        batch = [r for r in self.running if not self._finishes_by_length(r)]
        if not batch or not all(self._overlappable(r) for r in batch):
            return False
        if len(batch) > self.allocator.available_size():
            self.tree_cache.evict(len(batch) - self.allocator.available_size())
            if len(batch) > self.allocator.available_size():
                return False  # retraction: synchronous (prepare_decode)
        self.new_token_ratio = max(self.new_token_ratio - NEW_TOKEN_RATIO_DECAY, MIN_NEW_TOKEN_RATIO)
        previous = self.inflight_step
        self.inflight_step = self._launch_decode(batch)
        if previous is not None:
            self._process_inflight(previous)
            if all(r.finished for r in self.inflight_step.reqs):
                self.drain()  # nobody waits for its tokens: be idle now, not one step later
        return True

    def drain(self) -> bool:
        """Process the launched step, if any (waits for it). Returns whether there was one."""
        step, self.inflight_step = self.inflight_step, None
        if step is None:
            return False
        self._process_inflight(step)
        return True

    def _overlappable(self, req: Req) -> bool:
        """Whether the request's next decode step can launch before its last token is known: no
        grammar (its mask needs that token accepted), no logprobs, no penalties (they read the
        output ids), one pending token (none of a jump-forward's several)."""
        if req.grammar is not None or req.return_logprob or not overlap_supported(req.sampling_params):
            return False
        return req.inflight > 0 or req.pending_len == 1

    def _finishes_by_length(self, req: Req) -> bool:
        return self._length_reason(req, len(req.output_ids) + req.inflight) is not None

    def _launch_decode(self, reqs: list[Req]) -> InflightStep:
        assert self.worker is not None
        out_cache_loc = self.allocator.alloc(len(reqs))
        assert out_cache_loc is not None, "overlap_decode checked the room"
        input_ids = [r.future_ref if r.inflight else r.output_ids[-1] for r in reqs]
        fb = build_decode_batch(
            reqs, out_cache_loc, self.req_to_token_pool.req_to_token, input_ids=input_ids, device=self.batch_device
        )
        sampling = DecodeSampling(
            [r.sampling_params for r in reqs],
            [r.generator for r in reqs],
            [self._banned_ids(r, len(r.output_ids) + r.inflight) for r in reqs],
        )
        step, start = self.worker.launch(reqs, fb, sampling)
        for i, req in enumerate(reqs):
            req.kv_len += 1  # the slot is the request's now; its KV arrives with the step
            req.inflight += 1
            req.future_ref = FutureTokenMap.ref(start + i)
        self.stats["decode_steps"] += 1
        self.stats["overlap_decode_steps"] += 1
        return step

    def _process_inflight(self, step: InflightStep) -> None:
        """Append a finished step's tokens: finish checks, streaming. A request that finished or
        was aborted since the launch drops its token (release freed its slot)."""
        try:
            token_ids = step.token_ids()
        except Exception as exc:  # noqa: BLE001 - reported to every request of the step
            logger.exception("decode step of %d requests failed", len(step.reqs))
            for req in step.reqs:
                if not req.finished:  # still counting this step as in flight: release frees its slot
                    self.finish(req, {"type": "abort", "message": f"internal error: {type(exc).__name__}: {exc}"})
                req.inflight -= 1
        else:
            for req, token in zip(step.reqs, token_ids):
                req.inflight -= 1
                if not req.finished:
                    self._append_token(req, token)
        self.running = [r for r in self.running if not r.finished]
