"""Tensor parallelism in the scheduler: every rank runs the same batches.

Only rank 0 talks ZeroMQ. Every step it broadcasts what it received to the other ranks
(`TpLeaderIO` / `TpFollowerIO`), so every rank's scheduler sees the same messages in the same order
and, being deterministic, builds the same batches. What is not deterministic across processes is
decided by rank 0 and broadcast too (`TensorParallelScheduler`): the sampled tokens, and which
grammars have finished compiling.
"""

from __future__ import annotations

from typing import Any

import msgspec
import torch

from loom.runtime.ipc import decode, encode
from loom.runtime.model_executor.distributed import TpGroup
from loom.runtime.scheduler.io import ZmqIO
from loom.runtime.scheduler.scheduler import Scheduler


class TpLeaderIO:
    """Rank 0's I/O: ZeroMQ as one rank has it, and every `recv` broadcast to the other ranks."""

    def __init__(self, inner: ZmqIO, tp: TpGroup) -> None:
        self.inner, self.tp = inner, tp

    def recv(self) -> list[Any]:
        msgs = self.inner.recv()
        self.tp.broadcast_bytes(_pack(msgs))
        return msgs

    def send(self, msg: Any) -> None:
        self.inner.send(msg)

    def wait(self, timeout_ms: int) -> None:
        self.inner.wait(timeout_ms)


class TpFollowerIO:
    """Rank > 0's I/O: the messages rank 0 received; outputs go nowhere (rank 0 sends them)."""

    def __init__(self, tp: TpGroup) -> None:
        self.tp = tp

    def recv(self) -> list[Any]:
        return _unpack(self.tp.broadcast_bytes(None))  # raises RankStopped when rank 0 leaves

    def send(self, msg: Any) -> None:
        pass


def _pack(msgs: list[Any]) -> bytes:
    return msgspec.msgpack.encode([encode(m) for m in msgs]) if msgs else b""


def _unpack(data: bytes) -> list[Any]:
    return [decode(m) for m in msgspec.msgpack.decode(data)] if data else []


class TensorParallelScheduler(Scheduler):
    """A Scheduler whose rank-0 decisions that could differ between processes are broadcast."""

    def __init__(self, *args: Any, tp: TpGroup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tp = tp

    def _sample(self, logits, logprobs, rows: list[int], reqs: list[Any], premasked: frozenset[int] = frozenset()) -> list[int]:
        # Rank 0 samples (its RNG, its grammar masks) and the others take its tokens, so seeds
        # and float ties can never make the ranks' requests diverge.
        if not rows:
            return []
        ids = super()._sample(logits, logprobs, rows, reqs, premasked) if self.tp.rank == 0 else None
        return self.tp.broadcast_ids(ids, len(rows))

    def poll_grammars(self) -> None:
        # Compilation runs on threads and finishes at different moments in each process: rank 0
        # decides which requests leave the queue (index -> None: ready; a finished_reason: failed).
        queue = self.grammar_queue
        if self.tp.rank == 0:
            super().poll_grammars()
            still_queued = {id(r) for r, _, _ in self.grammar_queue}
            outcomes = [[i, req.finished_reason] for i, (req, _, _) in enumerate(queue) if id(req) not in still_queued]
            self.tp.broadcast_object(outcomes)
            return
        decided = {i: reason for i, reason in self.tp.broadcast_object(None)}
        pending = []
        for i, (req, fut, deadline) in enumerate(queue):
            if i not in decided:
                pending.append((req, fut, deadline))
            elif decided[i] is None:
                req.grammar = fut.result().matcher()  # compiled on rank 0, so it compiles here too
                self.waiting.append(req)
            else:
                self.finish(req, decided[i])
        self.grammar_queue = pending

    def _guarded(self, reqs: list[Any], out_cache_loc: torch.Tensor, fn: Any) -> None:
        # A batch that fails on one rank leaves the others inside a collective: no rank can carry
        # on alone, so the error ends the process and the front fails the server with it.
        fn()
