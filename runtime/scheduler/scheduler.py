"""The scheduler: receive requests, pick a batch, run it, process the results; repeat.

    step():  recv -> get_next_batch -> run (ModelRunner.forward + logits + sample) -> process result -> send
    overlap: recv -> launch decode N+1 (forward thread) -> process N's result -> send

The scheduler talks to the world only through `io` (`recv() -> list[msg]`, `send(msg)`), so the
same loop runs in-process under `loom.Engine` and in its own process behind ZeroMQ.

Grammars (regex / json_schema): a request's grammar compiles on `constrained.GrammarBackend`'s
threads while the request sits in `grammar_queue` (never in the batch); once compiled it joins
`waiting` with its matcher in `req.grammar`. Each step the rows with a grammar get a packed
bitmask (`_grammar_mask`) applied to their logits before sampling, and `_append_token` feeds the
sampled token to the matcher; batches without grammars skip both. On the CPU a decode row whose
grammar allows few tokens at this step (`_sparse_rows`: at most 1/SPARSE_LOGITS_SHARE of the
vocabulary) gets logits for those tokens only and no bitmask (`ModelRunner.compute_logits_sparse`).

Prefill-only requests (`max_new_tokens` 0) hold out their last prompt token (`Req.held_out`): it
gets no KV, and its logprob comes from the extend's last row, where sampling would be.

Jump-forward (`jump_forward.py`, off with `disable_jump_forward`): when, after a sampled token,
the grammar forces a string, the request's last unsent token is backed off and replaced by the
canonical tokenization of it + the forced string. Those tokens have no KV yet; the next decode
step computes them all at once: a step in which some request has more than one such token runs
as an extend from each request's `kv_len` (`build_extend_batch(..., from_kv_len=True)`).

Overlap scheduling (`overlap.py`; `disable_overlap_schedule`, default on with CUDA, see
CPU_OVERLAP_DEFAULT for the CPU): a decode step is launched on the forward thread and the step
launched before it is processed (tokens appended, finish checks, stop strings, streaming output)
while it runs, so step N+1 never waits for step N's tokens on the host: its inputs are future refs
that the forward thread resolves on the device. Consequences, all handled here:
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

KV memory accounting (checked after every step when `debug_check_memory` is on):

    free slots + evictable (tree) + protected (tree, locked) + held by running requests == capacity
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures
from typing import Any

import torch

from loom.radix_cache import ChunkCache, RadixCache
from loom.runtime.constrained import GrammarBackend, GrammarError, allocate_token_bitmask, grammar_source
from loom.runtime.constrained.jump_forward import MAX_BACKOFF, plan_jump_forward
from loom.runtime.messages import (
    AbortReq,
    BatchTokenIDOut,
    FlushCacheOut,
    FlushCacheReq,
    SchedulerInfoOut,
    SchedulerInfoReq,
    TokenIDOut,
    TokenizedGenerateReq,
)
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.scheduler.overlap import DecodeSampling, FutureTokenMap, InflightStep, OverlapWorker, overlap_supported
from loom.runtime.model_executor.sampling import ScratchRows, SamplingBatchInfo, compute_logprobs, gather_top_logprobs, sample
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler.schedule_batch import ExtendPlan, Req, build_decode_batch, build_extend_batch
from loom.runtime.scheduler.io import SchedulerIO
from loom.runtime.scheduler.schedule_policy import SchedulePolicy
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Future-token reservation (as SGLang): admit new requests only while the running ones keep room
# for `new_token_ratio` of their remaining max_new_tokens; the ratio decays while nothing is
# retracted and jumps back up after a retraction.
INIT_NEW_TOKEN_RATIO = 0.7
MIN_NEW_TOKEN_RATIO = 0.1
NEW_TOKEN_RATIO_DECAY = 0.001
RESERVE_CLIP = 4096

# Overlap scheduling when ServerArgs.disable_overlap_schedule is None, on CPU (CUDA: always on).
# Off: on CPU it measured no gain beyond the noise (benchmarks/bench_overlap.py, 2 CPU cores shared
# with other jobs, median tok/s overlap on vs off): tiny model (64 x 2 layers) batch 1: 508 vs 560,
# batch 16: 4879 vs 4621, batch 32: 12938 vs 13086; SmolLM2-135M-shaped batch 16, two runs: 42 vs
# 54 and 68 vs 43. A tiny model's forward is mostly Python, so the two threads take turns on the
# GIL; a bigger one's is compute that already fills the cores, next to which the scheduler's work
# is small. So the CPU keeps the simpler synchronous loop. With a GPU the forward thread mostly
# waits on the device, and the scheduler's work hides behind it.
CPU_OVERLAP_DEFAULT = False
SPARSE_LOGITS_SHARE = 16  # a grammar row allowing at most V / 16 tokens gets logits for those only (CPU)


class Scheduler:
    def __init__(
        self,
        args: ServerArgs,
        model_runner: ModelRunner,
        io: SchedulerIO,
        decode_tail: Callable[[list[int]], str],
        eos_token_ids: frozenset[int],
        tokenize: Callable[[str], list[int]] | None = None,
    ) -> None:
        self.args = args
        self.runner = model_runner
        self.io = io
        self.decode_tail = decode_tail  # token ids -> text, for stop-string checks
        self.eos_token_ids = eos_token_ids
        self.tokenize = tokenize  # text -> token ids (no special tokens), for jump-forward
        self.jump_forward = tokenize is not None and not args.disable_jump_forward
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.allocator = model_runner.token_to_kv_pool_allocator
        if args.disable_radix_cache:
            self.tree_cache = ChunkCache(self.req_to_token_pool, self.allocator)
        else:
            self.tree_cache = RadixCache(self.req_to_token_pool, self.allocator)
        self.radix = isinstance(self.tree_cache, RadixCache)
        self.policy = SchedulePolicy(args.schedule_policy, self.tree_cache, args.enable_in_batch_prefix_sharing)

        self.waiting: list[Req] = []
        self.running: list[Req] = []
        self.chunked_req: Req | None = None
        self.new_token_ratio = INIT_NEW_TOKEN_RATIO
        self.max_running = min(args.max_running_requests, self.req_to_token_pool.size)
        self.chunk_size = args.chunked_prefill_size if args.chunked_prefill_size > 0 else 1 << 62
        self.outbox: list[TokenIDOut] = []
        # Requests whose grammar is still compiling (off this thread): (req, future, deadline).
        self.grammar_queue: list[tuple[Req, Future, float]] = []
        self.grammar_backend: GrammarBackend | None = None  # built on the first grammar request
        # Overlap scheduling (runtime/scheduler/overlap.py); tensor-parallel ranks stay synchronous (their
        # sampling is a collective on the scheduler thread).
        overlap = args.disable_overlap_schedule
        overlap = (self.runner.device.type == "cuda" or CPU_OVERLAP_DEFAULT) if overlap is None else not overlap
        self.overlap = overlap and args.tp_size == 1
        self.worker = OverlapWorker(model_runner, self.max_running) if self.overlap else None
        self.inflight_step: InflightStep | None = None  # the launched decode step not processed yet
        # Batch index tensors go to the device through pinned memory on CUDA (host_to_device).
        self.batch_device = self.runner.device if self.runner.device.type == "cuda" else None
        self.stats = {
            "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "retracted": 0, "steps": 0,
            "decode_steps": 0, "overlap_decode_steps": 0, "jump_forwards": 0, "jump_forward_tokens": 0,
            "extend_tokens": 0,  # tokens computed by extend (prefill) steps
        }  # fmt: skip
        # Prefill steps' logits and logprobs (many rows when choices are scored) reuse two blocks.
        self.logits_scratch, self.logprobs_scratch = ScratchRows(), ScratchRows()

    # ------------------------------------------------------------------ the loop
    @torch.inference_mode()
    def step(self) -> bool:
        """Run one scheduler iteration. Returns False when there was nothing to do."""
        self.process_input(self.io.recv())
        if self.grammar_queue:
            self.poll_grammars()
        ran = self.overlap and self.overlap_decode()  # a forward pass ran (or was launched)
        drained = False
        if not ran:
            drained = self.drain()  # what runs next needs every launched step's tokens
            ran = self.sync_step()
        self.flush_outbox()
        if ran:
            self.stats["steps"] += 1
        if (ran or drained) and self.args.debug_check_memory:
            self.check_memory()
        return ran or drained

    def sync_step(self) -> bool:
        """Run a prefill (extend) batch, else a decode batch, and process its tokens at once."""
        plan = self.get_new_prefill_batch()
        if plan is not None:
            self._guarded(plan.reqs, plan.forward_batch.out_cache_loc, lambda: self.run_extend(plan))
            return True
        if not self.running:
            return False
        self.prepare_decode()
        if not self.running:
            return False
        reqs = list(self.running)
        out_cache_loc = self._alloc_slots(sum(r.pending_len for r in reqs))
        assert out_cache_loc is not None, "prepare_decode made room for every running request"
        self._guarded(reqs, out_cache_loc, lambda: self.run_decode(reqs, out_cache_loc))
        self.stats["decode_steps"] += 1
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.grammar_queue or self.inflight_step)

    # ------------------------------------------------------------------ overlap scheduling
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

    def _length_reason(self, req: Req, n_out: int) -> dict | None:
        """The finish reason of a request with n_out output tokens that reached its length limit
        (max_new_tokens or the model's context), else None."""
        if n_out >= req.sampling_params.max_new_tokens:
            return {"type": "length", "length": req.sampling_params.max_new_tokens}
        if len(req.origin_input_ids) + n_out >= self.runner.context_len:
            return {"type": "length", "length": n_out, "message": "reached the model's context length"}
        return None

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

    def _guarded(self, reqs: list[Req], out_cache_loc: torch.Tensor, fn: Callable[[], None]) -> None:
        """A failing batch aborts its own requests with the error; the scheduler keeps serving.

        The batch's new slots (`out_cache_loc`) are freed: the failed step's KV is never cached."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
            logger.exception("batch of %d requests failed", len(reqs))
            self.allocator.free(out_cache_loc)
            for req in reqs:
                # A newly admitted request's row holds just its cached prefix.
                req.kv_len = max(req.kv_len, req.prefix_len)
                if not req.finished:
                    self.finish(req, {"type": "abort", "message": f"internal error: {type(exc).__name__}: {exc}"})
            self.running = [r for r in self.running if not r.finished]
            if self.chunked_req is not None and self.chunked_req.finished:
                self.chunked_req = None

    # ------------------------------------------------------------------ input
    def process_input(self, msgs: list[Any]) -> None:
        for msg in msgs:
            if isinstance(msg, TokenizedGenerateReq):
                self.add_request(msg)
            elif isinstance(msg, AbortReq):
                self.abort_request(msg.rid, msg.message)
            elif isinstance(msg, FlushCacheReq):
                self.io.send(self.flush_cache())
            elif isinstance(msg, SchedulerInfoReq):
                self.io.send(self.info())
            else:
                logger.error("scheduler got an unknown message %r", type(msg).__name__)

    def add_request(self, msg: TokenizedGenerateReq) -> None:
        try:
            params = SamplingParams.from_dict(msg.sampling_params)
            if not msg.input_ids:
                raise ValueError("input_ids is empty")
        except ValueError as exc:  # the front validates; this guards other senders
            self.outbox.append(
                TokenIDOut(msg.rid, [], {"type": "abort", "message": str(exc)}, len(msg.input_ids), 0, 0, decode=msg.decode)
            )
            return
        req = Req(
            msg.rid,
            list(msg.input_ids),
            params,
            return_logprob=msg.return_logprob,
            logprob_start_len=msg.logprob_start_len,
            top_logprobs_num=msg.top_logprobs_num,
            stream=msg.stream,
            eos_token_ids=self.eos_token_ids,
            decode=msg.decode,
        )
        if req.return_logprob and req.logprob_start_len == 0:
            # The first prompt token has no logprob: nothing precedes it.
            req.pending_input_logprobs.append((None, req.origin_input_ids[0]))
            req.pending_input_top.append(None)
            req.input_logprob_pos = 1
        grammar = grammar_source(params)
        if grammar is not None:
            backend = self.get_grammar_backend()
            deadline = time.monotonic() + backend.compile_timeout_s
            self.grammar_queue.append((req, backend.compile(*grammar), deadline))
            return
        self.waiting.append(req)

    # ------------------------------------------------------------------ grammars
    def get_grammar_backend(self) -> GrammarBackend:
        if self.grammar_backend is None:
            def token_bytes() -> dict[int, bytes]:
                from transformers import AutoTokenizer

                from loom.runtime.constrained import token_bytes as read_token_bytes

                return read_token_bytes(AutoTokenizer.from_pretrained(self.args.tokenizer_path or self.args.model_path))

            self.grammar_backend = GrammarBackend(
                token_bytes, self.runner.vocab_size, self.eos_token_ids, grammar_backend=self.args.grammar_backend
            )
        return self.grammar_backend

    def poll_grammars(self) -> None:
        """Move requests whose grammar compiled to the waiting queue; finish those whose grammar
        failed or timed out. When there is nothing else to do, wait briefly for a compilation."""
        if not (self.waiting or self.running or self.chunked_req):
            wait_futures([f for _, f, _ in self.grammar_queue], timeout=0.05, return_when=FIRST_COMPLETED)
        now = time.monotonic()
        pending: list[tuple[Req, Future, float]] = []
        for req, fut, deadline in self.grammar_queue:
            if fut.done():
                exc = fut.exception()
                if exc is None:
                    req.grammar = fut.result().matcher()
                    self.waiting.append(req)
                else:
                    msg = str(exc) if isinstance(exc, GrammarError) else f"grammar compilation failed: {type(exc).__name__}: {exc}"
                    self.finish(req, self._grammar_rejected(req, msg))
            elif now > deadline:
                assert self.grammar_backend is not None
                kind, source = grammar_source(req.sampling_params)
                self.grammar_backend.forget(kind, source)
                limit = self.grammar_backend.compile_timeout_s
                self.finish(req, self._grammar_rejected(req, f"{kind} took longer than {limit:g}s to compile; simplify it"))
            else:
                pending.append((req, fut, deadline))
        self.grammar_queue = pending

    @staticmethod
    def _grammar_rejected(req: Req, message: str) -> dict:
        """The abort of a request whose grammar cannot be used: the user's mistake, so the server
        answers 400 naming the grammar's field (SGLang marks such aborts with a status code too)."""
        kind, _source = grammar_source(req.sampling_params)
        return {"type": "abort", "message": message, "status_code": 400, "param": f"sampling_params.{kind}"}

    def abort_request(self, rid: str, message: str) -> None:
        for i, (req, _, _) in enumerate(self.grammar_queue):
            if req.rid == rid:
                del self.grammar_queue[i]
                self.finish(req, {"type": "abort", "message": message})
                return
        for i, req in enumerate(self.waiting):
            if req.rid == rid:
                del self.waiting[i]
                self.finish(req, {"type": "abort", "message": message})
                return
        for req in self.running + ([self.chunked_req] if self.chunked_req else []):
            if req.rid == rid:
                self.finish(req, {"type": "abort", "message": message})
                self.running = [r for r in self.running if r is not req]
                if self.chunked_req is req:
                    self.chunked_req = None
                return

    def flush_cache(self) -> FlushCacheOut:
        if self.has_work():
            return FlushCacheOut(False, "cannot flush the cache while requests are running or waiting")
        self.tree_cache.reset()
        self.req_to_token_pool.clear()
        self.allocator.clear()
        return FlushCacheOut(True)

    # ------------------------------------------------------------------ scheduling
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

    # ------------------------------------------------------------------ running batches
    def run_extend(self, plan: ExtendPlan) -> None:
        hidden = self.runner.forward(plan.forward_batch)
        sample_rows: list[int] = []
        sample_reqs: list[Req] = []
        logits = None
        if plan.logit_rows:
            logits = self.runner.compute_logits(hidden[plan.logit_rows], self.logits_scratch)  # [N, V]
        logprobs = None
        if logits is not None and any(r.return_logprob for r in plan.reqs):
            logprobs = compute_logprobs(logits, self.logprobs_scratch.get(*logits.shape, logits.device))
        prompt_rows: list[tuple[int, Req, int]] = []  # (row, request, prompt token whose logprob it gives)
        for row, (i, pos) in enumerate(plan.row_owner):
            req = plan.reqs[i]
            if pos < len(req.origin_input_ids) and req.wants_input_logprobs() and pos == req.input_logprob_pos:
                prompt_rows.append((row, req, req.origin_input_ids[pos]))
                req.input_logprob_pos += 1
            elif pos == req.fill_len and not req.is_chunked and req.held_out is not None:
                prompt_rows.append((row, req, req.held_out))  # wants_last_row: its logprob was asked for
            elif pos == req.fill_len and not req.is_chunked and req.remaining_new_tokens > 0:
                sample_rows.append(row)
                sample_reqs.append(req)
        if prompt_rows:
            self._record_input_logprobs(logprobs, prompt_rows)

        next_ids = self._sample(logits, logprobs, sample_rows, sample_reqs)
        sampled = dict(zip(map(id, sample_reqs), next_ids))

        for req in plan.reqs:
            req.kv_len = req.prefix_len + req.extend_input_len
            self._cache_progress(req)
            if req.is_chunked:
                self.chunked_req = req
                continue
            if self.chunked_req is req:
                self.chunked_req = None
            token = sampled.get(id(req))
            if token is None:  # max_new_tokens == 0: prefill only
                self.finish(req, {"type": "length", "length": 0})
                continue
            self._append_token(req, token)
            if req.finished:
                continue
            self.running.append(req)

    @staticmethod
    def _record_input_logprobs(logprobs: torch.Tensor, prompt_rows: list[tuple[int, Req, int]]) -> None:
        """Prompt logprobs (and top logprobs where asked) of (row, request, token) triples, in
        order: one gather and one top-k for the whole step, not one device read per row."""
        rows = torch.tensor([r for r, _, _ in prompt_rows], dtype=torch.int64, device=logprobs.device)
        tokens = torch.tensor([t for _, _, t in prompt_rows], dtype=torch.int64, device=logprobs.device)
        values = logprobs[rows, tokens].tolist()
        top_at = [j for j, (_, req, _) in enumerate(prompt_rows) if req.top_logprobs_num]
        tops = gather_top_logprobs(logprobs[rows[top_at]], [prompt_rows[j][1].top_logprobs_num for j in top_at]) if top_at else []
        top_of = dict(zip(top_at, tops))
        for j, ((_, req, token), value) in enumerate(zip(prompt_rows, values)):
            req.pending_input_logprobs.append((value, token))
            if req.top_logprobs_num:
                req.pending_input_top.append(top_of[j])

    def run_decode(self, reqs: list[Req], out_cache_loc: torch.Tensor) -> None:
        req_to_token = self.req_to_token_pool.req_to_token
        if all(r.pending_len == 1 for r in reqs):
            fb = build_decode_batch(reqs, out_cache_loc, req_to_token, device=self.batch_device)
            hidden = self.runner.forward(fb)  # [B, H]
        else:  # jump-forwarded tokens: compute them all in this step, as an extend
            plan = build_extend_batch(reqs, out_cache_loc, req_to_token, from_kv_len=True, device=self.batch_device)
            hidden = self.runner.forward(plan.forward_batch)[plan.logit_rows]  # [B, H]
        sparse = self._sparse_rows(reqs)
        if sparse:  # rows whose grammar allows few tokens: logits for those only, already masked
            logits = self.runner.compute_logits_sparse(hidden, [sparse.get(i) for i in range(len(reqs))])
        else:
            logits = self.runner.compute_logits(hidden)  # [B, V]
        logprobs = compute_logprobs(logits) if any(r.return_logprob for r in reqs) else None
        next_ids = self._sample(logits, logprobs, list(range(len(reqs))), reqs, premasked=frozenset(sparse))
        for req, token in zip(reqs, next_ids):
            req.kv_len += req.pending_len
            self._append_token(req, token)
        self.running = [r for r in self.running if not r.finished]

    def _sparse_rows(self, reqs: list[Req]) -> dict[int, torch.Tensor]:
        """Decode rows whose grammar allows at most 1/SPARSE_LOGITS_SHARE of the vocabulary here (an
        integer's digits, an enum, the punctuation after a value) -> those token ids. On the CPU
        the LM head is a sixth of a decode step; such a row needs only a few of its dot products.
        Rows that return logprobs need the whole distribution and stay dense."""
        if not self.runner.can_compute_sparse_logits:
            return {}
        limit = self.runner.vocab_size // SPARSE_LOGITS_SHARE
        out: dict[int, torch.Tensor] = {}
        for i, req in enumerate(reqs):
            allowed_ids = getattr(req.grammar, "allowed_ids", None)
            if allowed_ids is None or req.return_logprob:
                continue
            ids = allowed_ids(limit)
            if ids is not None and ids.numel():
                out[i] = ids
        return out

    def _sample(self, logits, logprobs, rows: list[int], reqs: list[Req], premasked: frozenset[int] = frozenset()) -> list[int]:
        """Sample one token for each of `rows` (rows of `logits`, the requests `reqs`). Grammar
        rows are masked here, except those in `premasked` (indices into `reqs`), whose logits
        hold -inf outside their grammar's tokens already."""
        if not rows:
            return []
        rows_t = torch.tensor(rows, dtype=torch.int64)
        logits = logits.index_select(0, rows_t) if len(rows) != logits.shape[0] else logits
        info = SamplingBatchInfo.from_params(
            [r.sampling_params for r in reqs],
            output_ids=[r.output_ids for r in reqs],
            prompt_ids=[r.origin_input_ids for r in reqs],
            vocab_size=logits.shape[-1],
            device=logits.device,
            generators=[r.generator for r in reqs],
            banned_ids=[self._banned_ids(r) for r in reqs],
        )
        if any(r.grammar is not None and i not in premasked for i, r in enumerate(reqs)):
            info.vocab_mask = self._grammar_mask(reqs, logits.shape[-1], premasked)
        next_ids = sample(logits, info).tolist()
        if logprobs is not None:
            for row, req, token in zip(rows, reqs, next_ids):
                if req.return_logprob:
                    req.pending_output_logprobs.append((float(logprobs[row, token]), token))
                    if req.top_logprobs_num:
                        req.pending_output_top.append(
                            gather_top_logprobs(logprobs[row : row + 1], [req.top_logprobs_num])[0]
                        )
        return next_ids

    @staticmethod
    def _grammar_mask(reqs: list[Req], vocab_size: int, skip: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed bitmask [G, ceil(V / 32)] int32, the G batch rows it belongs to) for the rows
        with a grammar, but those in `skip`."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and i not in skip]
        bitmask = allocate_token_bitmask(len(rows), vocab_size)
        for j, i in enumerate(rows):
            reqs[i].grammar.fill_mask(bitmask[j])
        return bitmask, torch.tensor(rows, dtype=torch.int64)

    def _banned_ids(self, req: Req, n_out: int | None = None) -> list[int]:
        """Token ids the request may not sample as output number n_out + 1 (default: the next one)."""
        n_out = len(req.output_ids) if n_out is None else n_out
        if n_out >= req.sampling_params.min_new_tokens:
            return []
        banned = set(req.stop_token_ids)
        if not req.sampling_params.ignore_eos:
            banned |= req.eos_token_ids
        return sorted(banned)

    def _cache_progress(self, req: Req) -> None:
        """Share the request's computed tokens through the radix tree (so waiting requests and
        the next chunk reuse them); the tree then owns and protects those slots."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        tokens = req.fill_ids[: req.kv_len]
        new_indices, new_node = self.tree_cache.cache_unfinished(tokens, row[: req.kv_len].clone(), req.prefix_len, req.last_node)
        row[: new_indices.numel()] = new_indices
        req.prefix_indices, req.last_node = new_indices, new_node

    # ------------------------------------------------------------------ finishing
    def _append_token(self, req: Req, token: int) -> None:
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        if req.grammar is not None and not req.grammar.accept_token(token):
            self.finish(req, {"type": "abort", "message": f"internal error: sampled token {token} is not allowed by the grammar"})
            return
        reason = self._check_finished(req, token)
        if reason is None and req.grammar is not None and self.jump_forward and self._jump_forward(req):
            reason = self._check_finished(req, req.output_ids[-1])
        if reason is None and req.grammar is not None and req.grammar.is_terminated():
            reason = {"type": "stop", "matched": token if token in req.eos_token_ids else None}
        if reason is not None:
            self.finish(req, reason)
        elif req.stream:
            self._emit(req)

    def _jump_forward(self, req: Req) -> bool:
        """Append the string the grammar forces, canonically tokenized (see `jump_forward.py`).

        Only tokens not yet sent to the client are backed off, so streamed text never changes
        (the detokenizer needs no rollback), and only those whose KV the request holds alone, so
        no radix-tree node is touched. Skipped for requests that want logprobs (the forced tokens
        were never sampled: a logprob for them would be made up) and for stop strings / stop
        tokens (checked per sampled token; a forced string is not scanned for them)."""
        params = req.sampling_params
        if req.return_logprob or params.stop or params.stop_token_ids:
            return False
        n_fill = req.fill_len
        backoff = min(MAX_BACKOFF, len(req.output_ids) - req.sent_output_len, n_fill - req.prefix_len)
        max_new = min(req.remaining_new_tokens, self.runner.context_len - 1 - n_fill)
        if max_new <= 0:
            return False
        assert self.tokenize is not None
        # fill_ids[-(backoff + 1):] without copying the prompt (backoff <= len(output_ids))
        out = req.output_ids
        recent = out[len(out) - backoff - 1 :] if backoff < len(out) else req.origin_input_ids[-1:] + out
        jump = plan_jump_forward(req.grammar, recent, backoff, max_new, self.decode_tail, self.tokenize)
        if jump is None:
            return False
        if jump.backoff:
            # Backed-off tokens that already have KV give their slots back; the step recomputes them.
            start = n_fill - jump.backoff
            if start < req.kv_len:
                row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
                self.allocator.free(row[start : req.kv_len].clone())
                req.kv_len = start
            del req.output_ids[-jump.backoff :]
        req.output_ids.extend(jump.new_ids)
        self.stats["jump_forwards"] += 1
        self.stats["jump_forward_tokens"] += jump.gain
        self.stats["generated_tokens"] += jump.gain
        return True

    def _check_finished(self, req: Req, token: int) -> dict | None:
        params = req.sampling_params
        n_out = len(req.output_ids)
        if n_out >= params.min_new_tokens:
            if token in req.stop_token_ids or (not params.ignore_eos and token in req.eos_token_ids):
                return {"type": "stop", "matched": token}
            if params.stop:
                longest = max(len(s.encode()) for s in params.stop)
                tail = self.decode_tail(req.output_ids[-(longest + 2) :])
                for stop in params.stop:
                    if stop in tail:
                        return {"type": "stop", "matched": stop}
        return self._length_reason(req, n_out)

    def finish(self, req: Req, reason: dict) -> None:
        req.finished_reason = reason
        if req.req_pool_idx is not None:
            self.release(req, cache=True)
        self._emit(req)

    def release(self, req: Req, cache: bool) -> None:
        """Give back the request's KV: with cache=True its tokens go into the radix tree,
        otherwise (retraction) the slots it alone holds are freed. Unlocks its prefix either way."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        owned = req.prefix_len if self.radix else 0  # a chunk cache owns nothing
        if req.inflight:
            # Launched steps not processed yet (overlap): their slots go back (a later step may
            # take them; the forward thread writes it after these), and what is cached is what
            # the synchronous path would cache, the KV of fill_ids but the newest token.
            keep = max(min(req.kv_len, req.fill_len - 1), owned)
            self.allocator.free(row[keep : req.kv_len].clone())
            req.kv_len = keep
        if cache:
            tokens = req.fill_ids[: req.kv_len]
            self.tree_cache.cache_finished(tokens, row[: req.kv_len].clone(), owned, req.last_node)
        else:
            self.allocator.free(row[owned : req.kv_len].clone())
            self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    # ------------------------------------------------------------------ output
    def _emit(self, req: Req) -> None:
        self.outbox.append(
            TokenIDOut(
                rid=req.rid,
                new_token_ids=req.output_ids[req.sent_output_len :],
                finished_reason=req.finished_reason,
                prompt_tokens=req.prompt_len,
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                input_token_logprobs=req.pending_input_logprobs,
                output_token_logprobs=req.pending_output_logprobs,
                input_top_logprobs=req.pending_input_top,
                output_top_logprobs=req.pending_output_top,
                decode=req.decode,
            )
        )
        req.decode = None
        req.sent_output_len = len(req.output_ids)
        req.pending_input_logprobs, req.pending_input_top = [], []
        req.pending_output_logprobs, req.pending_output_top = [], []

    def flush_outbox(self) -> None:
        if self.outbox:
            self.io.send(BatchTokenIDOut(self.outbox))
            self.outbox = []

    # ------------------------------------------------------------------ checks
    def held_tokens(self) -> int:
        reqs = self.running + ([self.chunked_req] if self.chunked_req else [])
        return sum(r.kv_len - (r.prefix_len if self.radix else 0) for r in reqs)

    def check_memory(self) -> None:
        free = self.allocator.available_size()
        evictable = self.tree_cache.evictable_size()
        protected = self.tree_cache.protected_size()
        held = self.held_tokens()
        total = free + evictable + protected + held
        assert total == self.allocator.size, (
            f"KV pool leak: free {free} + evictable {evictable} + protected {protected} + held {held} "
            f"= {total} != capacity {self.allocator.size}"
        )

    def info(self) -> SchedulerInfoOut:
        """What /get_server_info shows of the scheduler: memory, counters, queue lengths."""
        return SchedulerInfoOut(self.memory_report(), dict(self.stats), len(self.running), len(self.waiting))

    def memory_report(self) -> dict[str, int]:
        return {
            "capacity": self.allocator.size,
            "free": self.allocator.available_size(),
            "evictable": self.tree_cache.evictable_size(),
            "protected": self.tree_cache.protected_size(),
            "held": self.held_tokens(),
        }
