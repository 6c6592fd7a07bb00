"""The scheduler process: ModelRunner + Scheduler behind ZeroMQ, one process per tensor-parallel rank.

PULL from the front (requests, aborts, flushes) and PUSH to the detokenizer (token ids, replies).
The loop steps the scheduler while it has work and otherwise blocks on a poll of its socket, so
an idle server burns no CPU. Every few seconds of work it hands the C heap's free pages back
(heap.py), so the process's memory follows what it holds, not the holes its tensors left.
Between any two steps, busy or idle, it checks that the front that started it still lives; once
it is gone the scheduler removes the socket folder and exits at once (`leave_orphaned`), and a send the detokenizer no longer reads stops blocking (`ParentGone`).

With tp_size > 1 there is one such process per rank; only rank 0 talks ZeroMQ and the others
follow it (`runtime/scheduler/tp_scheduler.py`). An idle rank 0 still steps once a second, which keeps the
others' waits in its broadcast well inside the collective timeout.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

import zmq

from loom.runtime.ipc import IpcPaths, ParentGone, leave_orphaned, parent_gone
from loom.runtime.messages import SchedulerReady
from loom.runtime.scheduler.heap import HeapTrimmer
from loom.runtime.scheduler.io import ZmqIO
from loom.runtime.server_args import ServerArgs

if TYPE_CHECKING:  # imported in the scheduler process only: the front stays free of torch
    from loom.runtime.model_executor.distributed import TpGroup
    from loom.runtime.scheduler.scheduler import Scheduler

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 1000  # an idle rank 0 steps this often (tensor parallelism: see above)
PENDING_POLL_MS = 2  # requests wait but none could run (grammars compiling, memory short)

# oneDNN, which runs the CPU's packed linear layers, compiles one primitive per matmul shape and
# keeps it in two LRU caches (oneDNN's own and PyTorch's ideep layer), 1,024 entries each by
# default, about 0.45 MB an entry. Every prefill length is a new shape, so a server seeing varied
# prompts grew by ~470 MB before they filled (1,024 entries = 256 lengths x 4 weight shapes). 64
# entries keep the running decode batch's shapes hot among the prefills (a miss costs 2-10 ms):
# on SmolLM2's four weight shapes, a mix of 150 prefill lengths and changing decode batches ran
# no slower and grew 26 MB instead of 340 (RELIABILITY.md). Set either variable for another bound.
NATIVE_CACHE_BOUNDS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "64"}


class StartupClock:
    """Where a process's start-up time went, phase by phase, for its "ready" log line."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps.append((phase, now - self.last))
        self.last = now

    def __str__(self) -> str:
        shown = ", ".join(f"{phase} {seconds:.2f}s" for phase, seconds in self.laps if seconds >= 0.005)
        return f"{time.perf_counter() - self.start:.2f}s ({shown})"


def run_scheduler_process(
    args_dict: dict[str, Any], paths: IpcPaths | None, parent_pid: int, log_level: str, tp_rank: int = 0
) -> None:
    """Process entry point. Exits when the parent goes away; any crash ends the process non-zero.

    With tp_size > 1 this is rank `tp_rank`; ranks > 0 need no `paths` (only rank 0 talks ZeroMQ)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front decides when we stop
    for var, entries in NATIVE_CACHE_BOUNDS.items():  # read when torch loads: before any import of it
        os.environ.setdefault(var, entries)
    who = "scheduler" if args_dict.get("tp_size", 1) == 1 else f"scheduler rank {tp_rank}"
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s {who}: %(message)s")
    clock = StartupClock()
    from loom.runtime.model_executor.distributed import TpGroup
    from loom.runtime.model_executor.model_runner import ModelRunner
    from loom.runtime.scheduler.scheduler import Scheduler
    from loom.runtime.scheduler.tp_scheduler import TensorParallelScheduler, TpFollowerIO, TpLeaderIO
    from loom.runtime.tokenizer import load_tokenizer, scheduler_text_hooks

    clock.lap("imports")
    args = ServerArgs(**args_dict)
    tp: TpGroup | None = None
    share = args.tp_per_node * args.dp_size  # processes computing on this node's cores at once
    if share > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // share))  # ranks and replicas share the cores
    if args.tp_size > 1:
        tp = TpGroup.init(args, tp_rank)
    ctx = zmq.Context()
    zmq_io = ZmqIO(ctx, paths, parent_pid) if tp_rank == 0 else None
    io: Any = zmq_io if tp is None else TpLeaderIO(zmq_io, tp) if tp_rank == 0 else TpFollowerIO(tp)
    clock.lap("process group")
    tokenizer = load_tokenizer(args)
    clock.lap("tokenizer")
    runner = ModelRunner(args, tp)
    clock.lap("model and KV pool")
    extra: dict[str, Any] = {} if tp is None else {"tp": tp}
    scheduler = (Scheduler if tp is None else TensorParallelScheduler)(
        args,
        runner,
        io,
        **scheduler_text_hooks(tokenizer, args.model_path, runner.hf_config),
        **extra,
    )
    if tp is not None:
        tp.barrier()  # every rank has its model and KV pool before rank 0 says ready
    clock.lap("scheduler")
    if zmq_io is not None:
        zmq_io.send(SchedulerReady(runner.context_len, runner.vocab_size, runner.max_total_tokens))
    # What startup built (model, tokenizer, imports: ~10^5 objects) lives as long as the process:
    # out of the collector's way, a full collection no longer walks it (80-140 ms pauses
    # measured between two grammar masks before, on the scheduler's thread).
    gc.collect()
    gc.freeze()
    logger.info("ready (pid %d) after %s", os.getpid(), clock)
    try:
        if tp_rank == 0:
            _leader_loop(scheduler, zmq_io, parent_pid, tp)
        else:
            _follower_loop(scheduler, parent_pid)
    except ParentGone:
        if tp is not None and tp_rank == 0:
            tp.stop_others()
        leave_orphaned(paths)
    except RuntimeError as exc:  # a collective failed: a peer died or hung past the timeout
        if tp is None:
            raise
        logger.error("tensor-parallel rank %d lost its peers: %s", tp_rank, exc)
        logging.shutdown()
        os._exit(1)  # at once: interpreter teardown with a broken process group can take seconds
    except SystemExit as exc:  # a normal stop (RankStopped on the other ranks, sys.exit in the loops)
        if tp is None:
            raise
        # Not through interpreter teardown: it destroys the process group's communication threads
        # while they still run, and the C++ runtime aborts the process (exit code -6) now and then.
        logging.shutdown()
        os._exit(exc.code if isinstance(exc.code, int) else 0)


def _leader_loop(scheduler: Scheduler, io: ZmqIO, parent_pid: int, tp: TpGroup | None) -> None:
    terminated = False
    if tp is not None:  # on SIGTERM (the front stops), leave between steps and take the other ranks along

        def on_sigterm(*_: Any) -> None:
            nonlocal terminated
            terminated = True

        signal.signal(signal.SIGTERM, on_sigterm)
    heap = HeapTrimmer()
    try:
        while True:
            if terminated:
                tp.stop_others()
                sys.exit(0)
            # Every iteration, busy or not (a getppid() call): a scheduler whose front died must
            # not decode on for the requests of nobody.
            if parent_gone(parent_pid):
                raise ParentGone()
            ran = scheduler.step()
            heap.after_step(ran)
            if ran:
                continue
            # Nothing ran: block on the socket; briefly while requests wait (e.g. grammars compiling).
            io.wait(PENDING_POLL_MS if scheduler.has_work() else IDLE_POLL_MS)
    except RuntimeError:
        if terminated:  # the front stops all ranks at once: a peer that went first is no failure
            os._exit(0)
        raise


def _follower_loop(scheduler: Scheduler, parent_pid: int) -> None:
    heap = HeapTrimmer()
    while True:
        heap.after_step(scheduler.step())  # blocks in rank 0's broadcast, which comes at least once a second
        if parent_gone(parent_pid):  # our node's launcher is gone: leave, and rank 0 fails with us
            logger.error("the process that started this rank is gone; exiting")
            sys.exit(1)


def _free_local_addr() -> str:
    """"127.0.0.1:PORT" with a port that was free a moment ago: the rendezvous of a one-node server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def spawn_scheduler_ranks(args: ServerArgs, paths: IpcPaths | None, log_level: str) -> list[tuple[str, Any]]:
    """Start this node's scheduler processes -> [(name, process)]; ranks node_rank * tp_per_node + i."""
    if args.tp_size > 1 and args.dist_init_addr is None:
        args = dataclasses.replace(args, dist_init_addr=_free_local_addr())
    spawn = mp.get_context("spawn")
    first = args.node_rank * args.tp_per_node
    procs = []
    for rank in range(first, first + args.tp_per_node):
        name = "scheduler" if args.tp_size == 1 else f"scheduler rank {rank}"
        proc = spawn.Process(
            target=run_scheduler_process,
            args=(args.to_dict(), paths, os.getpid(), log_level, rank),
            name=f"loom-{name.replace(' ', '-')}",
            daemon=True,
        )
        proc.start()
        procs.append((name, proc))
    return procs


def run_worker_node(args: ServerArgs, log_level: str = "warning") -> int:
    """`loom serve --node-rank N` (N > 0): run this node's ranks until they stop.

    -> 0 when node 0 stopped them (or on SIGINT / SIGTERM), 1 when one of them died."""
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    procs = spawn_scheduler_ranks(args, None, log_level)
    logger.warning("node %d: ranks %s joining %s", args.node_rank, [n for n, _ in procs], args.dist_init_addr)
    code = 0
    while not stopping:
        exited = [(name, p.exitcode) for name, p in procs if p.exitcode is not None]
        if any(c != 0 for _, c in exited):
            name, c = next((n, c) for n, c in exited if c != 0)
            print(f"loom serve: the {name} process died (exit code {c}); node {args.node_rank} stops", file=sys.stderr)
            code = 1
            break
        if len(exited) == len(procs):
            break  # node 0 stopped every rank
        time.sleep(0.25)
    for _, p in procs:
        if p.is_alive():
            p.terminate()
    for _, p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
    return code
