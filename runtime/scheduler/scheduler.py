"""The scheduler: receive requests, pick a batch, run it, process the results; repeat.

    step():  recv -> prefill batch (admission.py) or decode batch -> run it (batch_runner.py)
             -> append tokens, finish, emit (output.py) -> send
    overlap: recv -> launch decode N+1 on the forward thread -> process N's result -> send
             (overlap_scheduling.py)

The scheduler talks to the world only through `io` (`recv() -> list[msg]`, `send(msg)`; io.py), so
the same loop runs in-process under `LocalEngine` and in its own process behind ZeroMQ. Requests
with a grammar wait in the grammar queue (grammar_queue.py) until it compiles. The Scheduler is
this loop and its input; the stages are mixins over its state, one file each.

KV memory accounting (checked after every step when `debug_check_memory` is on):

    free slots + evictable (tree) + protected (tree, locked) + held by running requests == capacity
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

from loom.radix_cache import ChunkCache, PrefixCache, RadixCache
from loom.runtime.constrained import GrammarBackend, grammar_source
from loom.runtime.messages import (
    AbortReq,
    FlushCacheOut,
    FlushCacheReq,
    SchedulerInfoOut,
    SchedulerInfoReq,
    TokenIDOut,
    TokenizedGenerateReq,
)
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.model_executor.sampling import ScratchRows
from loom.runtime.sampling_params import SamplingParams
from loom.runtime.scheduler.admission import INIT_NEW_TOKEN_RATIO, PrefillAdmission
from loom.runtime.scheduler.batch_runner import BatchRunner
from loom.runtime.scheduler.grammar_queue import GrammarQueue
from loom.runtime.scheduler.heap import release_free_heap
from loom.runtime.scheduler.io import SchedulerIO
from loom.runtime.scheduler.output import OutputProcessor
from loom.runtime.scheduler.overlap import InflightStep, OverlapWorker
from loom.runtime.scheduler.overlap_scheduling import OverlapScheduling
from loom.runtime.scheduler.schedule_batch import Req
from loom.runtime.scheduler.schedule_policy import SchedulePolicy
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

# Overlap scheduling when ServerArgs.disable_overlap_schedule is None, on CPU (CUDA: always on).
# Off: on CPU it measured no gain beyond the noise (benchmarks/bench_overlap.py, 2 CPU cores shared
# with other jobs, median tok/s overlap on vs off): tiny model (64 x 2 layers) batch 1: 508 vs 560,
# batch 16: 4879 vs 4621, batch 32: 12938 vs 13086; SmolLM2-135M-shaped batch 16, two runs: 42 vs
# 54 and 68 vs 43. A tiny model's forward is mostly Python, so the two threads take turns on the
# GIL; a bigger one's is compute that already fills the cores, next to which the scheduler's work
# is small. So the CPU keeps the simpler synchronous loop. With a GPU the forward thread mostly
# waits on the device, and the scheduler's work hides behind it.
# Later, on SmolLM2-135M Q4_1 (16 x 48 greedy): on 280-340 tok/s, off 380-460. The forward thread
# starts a second OpenMP team beside the one model loading left on the scheduler's thread; with
# more OpenMP threads than cores libgomp stops spinning for both (26k voluntary context switches a
# batch, none with overlap off). Setting the scheduler thread's own count to 1 afterwards does not
# help: its team's threads stay (see compile_jobs._one_openmp_thread for the same effect).
CPU_OVERLAP_DEFAULT = False


class Scheduler(PrefillAdmission, BatchRunner, OutputProcessor, OverlapScheduling, GrammarQueue):
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
            self.tree_cache: PrefixCache = ChunkCache(self.req_to_token_pool, self.allocator)
        else:
            self.tree_cache = RadixCache(self.req_to_token_pool, self.allocator)
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
        out_cache_loc = self._alloc_slots(self.decode_slots(reqs))
        assert out_cache_loc is not None, "prepare_decode made room for every running request"
        self._guarded(reqs, out_cache_loc, lambda: self.run_decode(reqs, out_cache_loc))
        self.stats["decode_steps"] += 1
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req or self.grammar_queue or self.inflight_step)

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
            self.outbox.append(TokenIDOut(msg.rid, [], {"type": "abort", "message": str(exc)}, len(msg.input_ids), 0, 0, decode=msg.decode))
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
        """Empty the prefix cache and give its memory back: the tree's nodes, the KV pool's pages
        (`TokenToKVPool.release_pages`), the scratch blocks, on CUDA torch's cached device and
        pinned host blocks, and the C heap they and the steps' tensors leave free
        (`release_free_heap`). Refused while any request runs or waits."""
        if self.has_work():
            return FlushCacheOut(False, "cannot flush the cache while requests are running or waiting")
        self.tree_cache.reset()
        self.req_to_token_pool.clear()
        self.allocator.clear()
        self.runner.token_to_kv_pool.release_pages()
        self.logits_scratch, self.logprobs_scratch = ScratchRows(), ScratchRows()
        if self.runner.device.type == "cuda":
            torch.cuda.empty_cache()  # the caching allocator's free blocks: activations of every shape seen
            empty_host_cache = getattr(torch._C, "_host_emptyCache", None)
            if empty_host_cache is not None:
                empty_host_cache()  # the pinned host blocks behind host_to_device, one per size seen
        release_free_heap()
        return FlushCacheOut(True)

    # ------------------------------------------------------------------ checks
    def held_tokens(self) -> int:
        reqs = self.running + ([self.chunked_req] if self.chunked_req else [])
        shared = self.tree_cache.shares_prefixes  # else a request's prefix slots are its own
        return sum(r.kv_len - (r.prefix_len if shared else 0) for r in reqs)

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
