"""`loom.Engine`: SGLang's offline API.

    engine = Engine(model_path=...)
    engine.generate(prompt="...", sampling_params={...})  -> {"text", "output_ids", "meta_info"}

`Engine` (`ProcessEngine`) runs on the serving processes: a `loom serve --no-http` child and its
scheduler and detokenizer, reached through the ZeroMQ front door. `LocalEngine` runs the same
scheduler in the caller's thread, stepping it (through a local `SchedulerIO`) until every request
it submitted has its final answer: for tests, debugging and benchmarks of the engine alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, TypeVar

from loom.runtime.detokenizer.detokenizer import Detokenizer
from loom.runtime.front.tokenizer_manager import ReqState, TokenizerManager
from loom.runtime.messages import AbortReq, BatchStrOut, FlushCacheOut, FlushCacheReq
from loom.runtime.protocol import GenerateItem, GenerateRequest, RequestError
from loom.runtime.scheduler.io import LocalIO
from loom.runtime.server_args import ServerArgs
from loom.runtime.tokenizer import load_tokenizer, scheduler_text_hooks

logger = logging.getLogger(__name__)

# Steps in a row that run nothing while requests wait: a scheduling bug, reported, never a hang.
MAX_IDLE_STEPS = 1000


_E = TypeVar("_E", bound="_EngineBase")


class _EngineBase:
    """What both engines share: SGLang's `generate` signature, made into one `GenerateRequest`; a
    context manager that shuts down on exit; calls after shutdown raise."""

    _closed: bool

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] = 0,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> dict | list[dict] | Iterator[dict]:
        """Generate for one prompt (-> dict) or a list of prompts, or one prompt with
        `sampling_params.n` > 1 (-> a list of dicts, each prompt's samples next to each other).

        With stream=True (one prompt, one sample) returns an iterator of {"text": delta,
        "output_ids": new ids, "meta_info": ...} chunks, the last one carrying the finish_reason.
        Raises RequestError (a ValueError) naming the input when a request is malformed; nothing
        is submitted then."""
        self._check_open()
        request = GenerateRequest(
            text=prompt, input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs, stream=stream, rid=rid,
            reject_invalid=False,  # an invalid grammar aborts its own request, with the reason in meta_info
            text_name="prompt",
        )  # fmt: skip
        items = request.items()
        if stream and request.answers_list():
            raise RequestError("stream=True takes a single prompt, not a list", "prompt")
        return self._generate(request, items)

    def _generate(self, request: GenerateRequest, items: list[GenerateItem]) -> dict | list[dict] | Iterator[dict]:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Engine was shut down")

    def __enter__(self: _E) -> _E:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class LocalEngine(_EngineBase):
    """The engine in the caller's thread: the scheduler steps only while `generate` waits. For tests
    and debugging (its scheduler and model runner are plain attributes); `loom.Engine` is this API
    on the serving processes."""

    def __init__(self, model_path: str | None = None, **kwargs: Any) -> None:
        self.server_args = ServerArgs.from_kwargs(model_path, **kwargs)
        args = self.server_args
        if args.dp_size > 1:
            raise ValueError("dp_size > 1 runs replicas in their own processes: use loom.Engine or loom serve, not LocalEngine")
        self.tokenizer = load_tokenizer(args)
        # Here, not at the top: `loom.Engine` (the serving processes) imports this module too, and its
        # process needs neither torch nor the model code.
        from loom.runtime.model_executor.model_runner import ModelRunner
        from loom.runtime.scheduler.scheduler import Scheduler

        self.model_runner = ModelRunner(args)
        self.io = LocalIO()
        self.scheduler = Scheduler(
            args,
            self.model_runner,
            self.io,
            **scheduler_text_hooks(self.tokenizer, args.model_path, self.model_runner.hf_config),
        )
        self.detokenizer = Detokenizer(self.tokenizer)  # the serving processes' detokenizer, in this thread
        self.tokenizer_manager = TokenizerManager(
            self.tokenizer,
            context_len=self.model_runner.context_len,
            vocab_size=self.model_runner.vocab_size,
            max_total_tokens=self.model_runner.max_total_tokens,
        )
        self._states: dict[str, ReqState] = {}
        self._deltas: dict[str, list[str]] = {}
        self._closed = False
        self._flush_result: FlushCacheOut | None = None

    # ------------------------------------------------------------------ API
    def _generate(self, request: GenerateRequest, items: list[GenerateItem]) -> dict | list[dict] | Iterator[dict]:
        reqs, states = self.tokenizer_manager.tokenize(request, items)
        for state in states:
            if state.rid in self._states:
                raise RequestError(f"rid {state.rid!r} is already in use by a running request", "rid")
        if request.stream:
            return self._stream(reqs[0], states[0])
        for req, state in zip(reqs, states):
            self._states[req.rid] = state
            self.io.inbox.append(req)
        try:
            self._run_until(lambda: all(s.finished for s in states))
        finally:
            for state in states:
                self._states.pop(state.rid, None)
        results = [self.tokenizer_manager.result(s) for s in states]
        return results if request.answers_list() else results[0]

    def _stream(self, req, state: ReqState) -> Iterator[dict]:
        self._states[req.rid] = state
        self._deltas[req.rid] = []
        self.io.inbox.append(req)
        sent_ids = 0
        try:
            while True:
                self._run_until(lambda: state.finished or bool(self._deltas[req.rid]))
                text = "".join(self._deltas[req.rid])
                self._deltas[req.rid].clear()
                chunk = self.tokenizer_manager.result(state)
                chunk["text"] = text
                chunk["output_ids"] = state.output_ids[sent_ids:]
                sent_ids = len(state.output_ids)
                # Decide before yielding: other streams may finish this request while we wait.
                last = state.finished
                yield chunk
                if last:
                    return
        finally:
            if not state.finished:  # the consumer stopped early: abort and release its memory
                self.io.inbox.append(AbortReq(req.rid, "the stream was closed by the caller"))
                self._run_until(lambda: state.finished)
            self._states.pop(req.rid, None)
            self._deltas.pop(req.rid, None)

    def _run_until(self, done) -> None:
        stalled = 0
        while not done():
            progressed = self.scheduler.step()
            self._drain()
            if done():
                return
            if not self.scheduler.has_work() and not self.io.inbox:
                raise RuntimeError("the scheduler went idle before every request finished (a lost request)")
            stalled = 0 if progressed else stalled + 1
            if stalled > MAX_IDLE_STEPS:
                raise RuntimeError(f"the scheduler holds requests but cannot run any: {self.scheduler.memory_report()}")

    def _drain(self) -> None:
        while self.io.outbox:
            msg = self.detokenizer.handle(self.io.outbox.popleft())
            if isinstance(msg, BatchStrOut):
                for out in msg.outputs:
                    state = self._states.get(out.out.rid)
                    if state is None:
                        continue
                    delta = self.tokenizer_manager.process_output(state, out)
                    if out.out.rid in self._deltas and (delta or state.finished):
                        self._deltas[out.out.rid].append(delta)
            elif isinstance(msg, FlushCacheOut):
                self._flush_result = msg

    def flush_cache(self) -> bool:
        """Drop every cached prefix. Returns False (and flushes nothing) while requests run."""
        self._check_open()
        self._flush_result = None
        self.io.inbox.append(FlushCacheReq())
        self.scheduler.step()
        self._drain()
        result = self._flush_result
        return bool(result and result.success)

    def get_server_info(self) -> dict[str, Any]:
        return {
            **self.server_args.to_dict(),
            "max_total_tokens": self.model_runner.max_total_tokens,
            "context_length": self.model_runner.context_len,
            "memory": (info := self.scheduler.info()).memory,
            "stats": info.stats,
        }

    def shutdown(self) -> None:
        self._closed = True
        if self.scheduler.grammar_backend is not None:
            self.scheduler.grammar_backend.shutdown()
        if self.scheduler.worker is not None:
            self.scheduler.drain()  # a launched decode step finishes, and its requests get their answers
            self.scheduler.worker.shutdown()


class ProcessEngine(_EngineBase):
    """`loom.Engine` on the serving processes: a `loom serve --no-http` child (front, scheduler and
    detokenizer processes) reached through its ZeroMQ front door. Same API as the in-process
    engine; the scheduler's objects are not reachable from here, `get_server_info()` reports them."""

    def __init__(self, model_path: str | None = None, *, log_level: str = "warning", **kwargs: Any) -> None:
        from loom.runtime.entrypoints.launch import ServerProcess
        from loom.runtime.protocol import FrontDoorClient

        self.server_args = ServerArgs.from_kwargs(model_path, **kwargs)  # validates before any process starts
        self._server = ServerProcess(str(model_path), log_level=log_level, **kwargs)
        self._client = FrontDoorClient(self._server.address, is_dead=self._server.exit_reason)
        self._tokenizer: Any = None
        self._closed = False

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.server_args)
        return self._tokenizer

    @property
    def front_door_address(self) -> str:
        """The engine's ZeroMQ front door (`ipc://...`), where prompt programs reach the same
        processes and cache: `loom.ZmqEndpoint(engine.front_door_address)`."""
        return self._server.address

    def _generate(self, request: GenerateRequest, items: list[GenerateItem]) -> dict | list[dict] | Iterator[dict]:
        # Checked here already (items()), so a malformed call fails before any message is sent.
        body = request.to_body()
        if not request.stream:
            return self._client.call("generate", body)
        return self._stream(body)

    def _stream(self, body: dict[str, Any]) -> Iterator[dict]:
        for chunk in self._client.stream("generate", body):  # deltas, as LocalEngine streams them
            chunk.pop("index", None)  # one prompt: no position to name
            yield chunk

    def flush_cache(self) -> bool:
        """Drop every cached prefix. Returns False (and flushes nothing) while requests run."""
        self._check_open()
        try:
            self._client.call("flush_cache")
        except ValueError:
            return False
        return True

    def get_server_info(self) -> dict[str, Any]:
        self._check_open()
        return self._client.call("get_server_info")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client.close()
        self._server.shutdown()


Engine = ProcessEngine  # `loom.Engine`: SGLang's offline API on the serving processes
