"""`AsyncEngine`: the front of the served engine, in the server's event loop.

Starts the scheduler and detokenizer processes (`processes.py`) and waits until the model is
loaded; tokenizes and validates requests (the `TokenizerManager`); keeps the request table, and
streams results back:

    front --PUSH--> scheduler --PUSH--> detokenizer --PUSH--> front (PULL, this object)

Every request that enters gets exactly one final answer: its result, an abort, or
`EngineDeadError` when a child process died (the HTTP layer answers 503 and exits non-zero) or
when the server shuts down and its grace period ran out (`stop_admitting`, then `abort_all`).

Nothing a client sends runs long on the event loop: large prompts are tokenized, and chat
templates rendered, on worker threads (`off_loop`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from loom.runtime.front.metrics import FrontMetrics, mark_counted
from loom.runtime.front.processes import EngineProcesses
from loom.runtime.front.tokenizer_manager import ReqState, TokenizerManager
from loom.runtime.ipc import IpcPaths, decode, encode
from loom.runtime.messages import (
    AbortReq,
    BatchStrOut,
    FlushCacheOut,
    FlushCacheReq,
    SchedulerInfoOut,
    SchedulerInfoReq,
    SchedulerReady,
)
from loom.runtime.protocol import GenerateItem, GenerateRequest, RequestError
from loom.runtime.server_args import ServerArgs
from loom.runtime.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25
REPLY_TIMEOUT_S = 30.0
# A call whose prompts hold more characters (or token ids) than this is tokenized on a worker
# thread (Hugging Face's fast tokenizers release the GIL); smaller ones take well under a
# millisecond inline, and skip the hop.
TOKENIZE_INLINE_MAX = 2048
OFF_LOOP_THREADS = 4


class EngineDeadError(RuntimeError):
    """A child process died: the engine cannot answer any request any more."""


def _rejection(state: ReqState, index: int | None) -> RequestError | None:
    """The client error behind a request the scheduler refused (an invalid grammar), if any: the
    caller answers it as a 4xx instead of a result with an abort finish_reason."""
    reason = state.finished_reason or {}
    status = reason.get("status_code")
    if reason.get("type") != "abort" or not isinstance(status, int) or not 400 <= status < 500:
        return None
    where = f"request {index}: " if index is not None else ""
    return RequestError(where + str(reason.get("message", "rejected")), reason.get("param"), status)


@dataclass
class _Entry:
    index: int
    state: ReqState
    queue: asyncio.Queue  # shared by the requests of one generate call: (index, delta) or _DEAD
    sent_ids: int = 0
    last_token_time: float | None = None


_DEAD = object()  # in a call's queue: a child process died
_ABORT_REASONS = {"abandoned": "the client went away", "aborted": "the server ended the request",
                  "refused": "another request of its call was refused"}  # fmt: skip


@dataclass(frozen=True)
class _Ended:
    """In a call's queue: the server ended the call (shutdown past its grace period)."""

    reason: str


class GenerateAPI:
    """`generate(request)` over an engine's `generate_items`: the answer's shape (one result, or a
    list for a batch or n > 1) decided once, from the request."""

    def generate_items(self, request: GenerateRequest, items: list[GenerateItem]) -> AsyncIterator[Any]:
        raise NotImplementedError

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Any]:
        """Not streamed: yields once, the result (a list for a batch or n > 1, in `items()` order).
        Streamed: the chunks of `generate_items`. Raises RequestError naming a malformed field."""
        items = request.items()
        whole = request.stream or request.is_batch or len(items) > 1  # else one result, not a list
        agen = self.generate_items(request, items)
        try:
            async for out in agen:
                yield out if whole else out[0]
        finally:
            await agen.aclose()


class AsyncEngine(GenerateAPI):
    def __init__(self, server_args: ServerArgs, log_level: str = "warning") -> None:
        self.server_args = server_args
        self.log_level = log_level
        self.tokenizer: Any = None  # loaded in start(), while the children start
        self.tokenizer_manager: TokenizerManager | None = None
        self.ready: SchedulerReady | None = None
        self.dead_reason: str | None = None
        self.on_death: Callable[[str], None] | None = None
        self._reqs: dict[str, _Entry] = {}
        self.children = EngineProcesses()
        self._paths: IpcPaths | None = None
        self._tasks: list[asyncio.Task] = []
        self._replies: dict[type, asyncio.Future] = {}
        self._reply_lock = asyncio.Lock()
        self._closed = False
        self.closing: str | None = None  # set by stop_admitting: new requests get EngineDeadError (503)
        self._ended: str | None = None  # set by abort_all: no request may start any more
        self.metrics = FrontMetrics()
        self._pool = ThreadPoolExecutor(OFF_LOOP_THREADS, thread_name_prefix="loom-front")

    # ------------------------------------------------------------------ life cycle
    async def start(self, timeout_s: float = 600.0) -> None:
        """Start the processes and return once the scheduler has loaded the model.

        Raises EngineDeadError when a child dies first, TimeoutError after `timeout_s`."""
        self._paths = paths = IpcPaths.create()
        self._ctx = zmq.Context()
        self._actx = zmq.asyncio.Context()
        self._pull = self._actx.socket(zmq.PULL)
        self._pull.bind(paths.to_front)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.connect(paths.to_scheduler)
        self.children.start(self.server_args, paths, self.log_level)
        try:  # here, not before: the children import and load the model meanwhile
            self.tokenizer = load_tokenizer(self.server_args)
        except BaseException:
            await self.shutdown()
            raise
        deadline = time.monotonic() + timeout_s
        while self.ready is None:
            self._check_children()
            if self.dead_reason:
                await self.shutdown()
                raise EngineDeadError(self.dead_reason)
            if time.monotonic() > deadline:
                await self.shutdown()
                raise TimeoutError(f"the scheduler was not ready after {timeout_s:.0f}s")
            if await self._pull.poll(200):
                msg = decode(await self._pull.recv())
                if isinstance(msg, SchedulerReady):
                    self.ready = msg
        self.tokenizer_manager = TokenizerManager(
            self.tokenizer,
            context_len=self.ready.context_len,
            vocab_size=self.ready.vocab_size,
            max_total_tokens=self.ready.max_total_tokens,
        )
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._watch_loop())]

    async def shutdown(self) -> None:
        """Stop the children (SIGTERM, then SIGKILL), close the sockets, remove the socket folder."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        self.children.stop()
        self._fail_all("the server is shutting down")
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sock in (getattr(self, "_pull", None), getattr(self, "_push", None)):
            if sock is not None:
                sock.close(linger=0)
        if self._paths is not None:
            self._paths.remove()

    @property
    def ipc_dir(self) -> str | None:
        return self._paths.root if self._paths else None

    @property
    def child_pids(self) -> dict[str, int]:
        return self.children.pids

    def _check_children(self) -> None:
        if self._closed or self.dead_reason:
            return
        reason = self.children.death()
        if reason is not None:
            self._die(reason)

    def _die(self, reason: str) -> None:
        if self.dead_reason:
            return
        self.dead_reason = reason
        logger.error(reason)
        self._fail_all(reason)
        if self.on_death is not None:
            self.on_death(reason)

    def _fail_all(self, reason: str) -> None:
        for entry in list(self._reqs.values()):
            entry.queue.put_nowait(_DEAD)
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))

    async def _watch_loop(self) -> None:
        while not self.dead_reason:
            self._check_children()
            await asyncio.sleep(WATCH_INTERVAL_S)

    async def _recv_loop(self) -> None:
        try:
            await self._recv_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not leave requests waiting forever
            logger.exception("the front's receive loop failed")
            self._die(f"the front's receive loop failed: {type(exc).__name__}: {exc}")

    async def _recv_forever(self) -> None:
        while True:
            self._dispatch(decode(await self._pull.recv()))

    def _dispatch(self, msg: Any) -> None:
        """Fold one message from the detokenizer into the request table (no awaiting in here)."""
        if isinstance(msg, BatchStrOut):
            for out in msg.outputs:
                entry = self._reqs.get(out.out.rid)
                if entry is None:
                    continue  # its caller left (aborted); nothing to answer
                delta = self.tokenizer_manager.process_output(entry.state, out)
                now = time.perf_counter()
                n_new = len(out.out.new_token_ids)
                self.metrics.observe(entry.state, n_new, entry.last_token_time, now)
                if n_new:
                    entry.last_token_time = now
                entry.queue.put_nowait((entry.index, delta, out.out.finished_reason is not None))
        else:
            fut = self._replies.get(type(msg))
            if fut is not None and not fut.done():
                fut.set_result(msg)

    def _send(self, msg: Any) -> None:
        self._push.send(encode(msg))

    def check_alive(self) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        if self.closing:
            raise EngineDeadError(self.closing)
        if self._closed or self.tokenizer_manager is None:
            raise EngineDeadError("the engine is not running")

    async def off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) on a worker thread: for what a client can make long (tokenizing a
        large prompt, rendering a chat template), so that it holds up no other client."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    # ------------------------------------------------------------------ shutting down
    def stop_admitting(self, reason: str = "the server is shutting down") -> None:
        """From now on new requests get EngineDeadError(reason) (503); running ones go on."""
        self.closing = reason

    def abort_all(self, reason: str) -> int:
        """End every running request now: the scheduler drops it, its caller gets
        EngineDeadError(reason) (503). Logs one line per generate call -> how many calls."""
        calls: dict[int, list[_Entry]] = {}
        for entry in self._reqs.values():
            calls.setdefault(id(entry.queue), []).append(entry)
        for entries in calls.values():
            rids = ", ".join(e.state.rid for e in entries)
            tokens = sum(len(e.state.output_ids) for e in entries)
            logger.warning("aborted request %s (%d tokens generated): %s", rids, tokens, reason)
            entries[0].queue.put_nowait(_Ended(reason))
        self._ended = reason
        for fut in self._replies.values():
            if not fut.done():
                fut.set_exception(EngineDeadError(reason))
        return len(calls)

    # ------------------------------------------------------------------ requests
    async def generate_items(self, request: GenerateRequest, items: list[GenerateItem]) -> AsyncIterator[Any]:
        """Run `items` (of `request`: its stream and logprob-text options). Not streamed: yields
        once, the list of results in the order of `items`. Streamed: yields chunks {"text": delta,
        "output_ids": new ids, "meta_info", "index": item.index}; each item's last chunk carries
        its finish_reason.

        Raises RequestError (bad input, nothing submitted) or EngineDeadError. An item the
        scheduler refuses (an invalid grammar) raises RequestError before any output when
        `request.reject_invalid`; otherwise it is a result with an abort finish_reason like any
        other. Closing the iterator early aborts the unfinished items, which frees their KV."""
        self.check_alive()
        reqs, states = await self._tokenize(request, items)
        if self.dead_reason or self._ended or self._closed:  # it ended while this call was tokenized
            raise EngineDeadError(self.dead_reason or self._ended or "the engine is not running")
        seen = set()
        for state in states:
            if state.rid in self._reqs or state.rid in seen:
                raise RequestError(f"rid {state.rid!r} is already in use by a running request", "rid")
            seen.add(state.rid)
        queue: asyncio.Queue = asyncio.Queue()
        entries: dict[int, _Entry] = {}
        for item, req, state in zip(items, reqs, states):
            entry = entries[item.index] = _Entry(item.index, state, queue)
            self._reqs[req.rid] = entry
            self._send(req)
        numbered = request.answers_list()
        yielded = False
        ending = "abandoned"  # how the unfinished items end if the caller stops listening
        try:
            unfinished = len(entries)
            while unfinished:
                # Take everything that arrived: the states already hold all of it.
                got = [await queue.get()]
                while not queue.empty():
                    got.append(queue.get_nowait())
                texts: dict[int, str] = {}
                for item in got:
                    if item is _DEAD or isinstance(item, _Ended):
                        ending = "aborted"
                        reason = item.reason if isinstance(item, _Ended) else self.dead_reason or "the engine stopped"
                        raise mark_counted(EngineDeadError(reason))
                    index, delta, final = item
                    texts[index] = texts.get(index, "") + delta
                    unfinished -= final
                    if final and request.reject_invalid and not yielded:
                        rejected = _rejection(entries[index].state, index if numbered else None)
                        if rejected is not None:
                            ending = "refused"
                            raise mark_counted(rejected)  # the finally below aborts the call's other requests
                if not request.stream:
                    continue
                for index, text in texts.items():
                    entry = entries[index]
                    if text or entry.state.finished or len(entry.state.output_ids) > entry.sent_ids:
                        chunk = self.tokenizer_manager.result(entry.state)
                        chunk["text"] = text
                        chunk["output_ids"] = entry.state.output_ids[entry.sent_ids :]
                        chunk["index"] = index
                        entry.sent_ids = len(entry.state.output_ids)
                        yielded = True
                        yield chunk
            if not request.stream:
                yield [self.tokenizer_manager.result(entries[item.index].state) for item in items]
        finally:
            now = time.perf_counter()
            for entry in entries.values():
                self._reqs.pop(entry.state.rid, None)
                self.metrics.count_end(entry.state, ending, now)
                if not entry.state.finished and not self.dead_reason and not self._closed:
                    self._send(AbortReq(entry.state.rid, _ABORT_REASONS[ending]))

    async def _tokenize(self, request: GenerateRequest, items: list[GenerateItem]) -> tuple[list, list[ReqState]]:
        """TokenizerManager.tokenize, on a worker thread when the prompts are large."""
        size = sum(len(i.text) if i.text is not None else len(i.input_ids or ()) for i in items)
        if size <= TOKENIZE_INLINE_MAX:
            return self.tokenizer_manager.tokenize(request, items)
        return await self.off_loop(self.tokenizer_manager.tokenize, request, items)

    def abort(self, rid: str) -> bool:
        """Abort a running request by rid; its caller gets an abort finish_reason. False: unknown rid."""
        self.check_alive()
        if rid not in self._reqs:
            return False
        self._send(AbortReq(rid, "aborted by /abort_request"))
        return True

    async def _ask(self, req: Any, reply_type: type) -> Any:
        self.check_alive()
        async with self._reply_lock:
            fut = asyncio.get_running_loop().create_future()
            self._replies[reply_type] = fut
            self._send(req)
            try:
                return await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
            finally:
                self._replies.pop(reply_type, None)

    async def flush_cache(self) -> FlushCacheOut:
        return await self._ask(FlushCacheReq(), FlushCacheOut)

    async def scheduler_info(self) -> SchedulerInfoOut:
        return await self._ask(SchedulerInfoReq(), SchedulerInfoOut)

    async def health_generate(self) -> None:
        """Run one tiny greedy generation end to end; raises if the engine cannot."""
        async for _ in self.generate(GenerateRequest(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})):
            pass

    @property
    def num_running(self) -> int:
        return len(self._reqs)
