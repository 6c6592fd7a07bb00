"""The executor: one thread per program state runs what the program appends, in order.

The program body runs on its own thread (the caller's, or a `run_batch` worker) and only queues
work; it blocks only where it reads a result (`s["name"]`, `s.text()`, `fork`). So text that
does not depend on a generation keeps flowing while a request is in flight, and many programs
share the server's batch.

A failure (a 4xx/5xx answer, a broken stream, a bad argument) stops the state: the rest of its
queue is skipped, `error()` returns the exception, and whoever waits for a value gets it raised.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import loom.lang.ir as ir
from loom.lang.backend.base import Backend
from loom.lang.chat_template import ChatTemplate
from loom.lang.run_trace import CallRecord, ForkRecord, JoinRecord, TraceRecord

logger = logging.getLogger(__name__)


class ProgramError(RuntimeError):
    """A value was asked of a state whose program failed; `__cause__` is the failure."""


@dataclass(frozen=True, slots=True)
class _Commit:
    """Prefill the text so far: before a fork ("commit"), or in a fork's first branch before a
    concate_and_append join ("join"), so the parent's continuation finds that branch cached."""

    kind: str = "commit"


@dataclass(frozen=True, slots=True)
class _Join:
    """A fork's branches joined back into the state that forked at `fork_chars`: in the trace, and
    for concate_and_append the branches' new text to append. `first_mark` is the first branch's
    token mark after its join commit: the parent's text then starts with that branch's whole text,
    so the mark holds for the parent too."""

    mode: str
    size: int
    text: str = ""
    fork_chars: int = 0
    first_mark: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class _End:
    """No more work: the thread exits after this."""


@dataclass(frozen=True, slots=True)
class StreamEvent:
    text: str
    var: str | None  # the gen/select that produced it; None for the program's own text


class StreamExecutor:
    """The state of one program (or one fork branch) and the thread that advances it."""

    def __init__(self, backend: Backend, defaults: ir.SamplingParams, stream: bool = False,
                 warmer: BatchWarmer | None = None, arguments: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.backend = backend
        self.defaults = defaults
        self.stream = stream
        self.arguments = arguments or {}
        self.warmer = warmer
        self.batch_warmer = warmer  # kept after the first request, for the run's trace
        self.text = ""
        self.messages: list[dict[str, Any]] = []
        self.token_mark: tuple[int, int] | None = None
        self.variables: dict[str, Any] = {}
        self.meta_info: dict[str, Any] = {}
        self.events: list[StreamEvent] = []
        self.error: BaseException | None = None
        self._template: ChatTemplate | None = None
        self._role: tuple[str, int] | None = None  # the open role and where its content starts
        self._roles_seen = 0
        self._scopes: dict[str, int] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._pending = 0  # submitted but not yet done
        self._finished = False
        self._children: list[StreamExecutor] = []
        # The run's trace (see loom.lang.run_trace): where this state sits in the fork tree, when it
        # began and ended, and what it asked of the backend, in order.
        self.branch: tuple[int, ...] = ()
        self.created = time.perf_counter()
        self.finished: float | None = None
        self._records: list[TraceRecord] = []
        self._thread = threading.Thread(target=self._loop, name="loom-program", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ program side
    def submit(self, item: Any) -> None:
        with self._cond:
            if self._finished:
                raise RuntimeError("this program state has ended; it takes no more text")
            self._pending += 1
        self._queue.put(item)

    def sync(self) -> None:
        """Wait until everything submitted so far is done."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending == 0)

    def end(self) -> None:
        for child in self._children:  # branches nobody joined end with their parent
            child.end()
        with self._cond:
            if self._finished:
                return
            self._finished = True
            self._pending += 1
        self._queue.put(_End())

    def join_thread(self) -> None:
        self._thread.join()

    def get_var(self, name: str) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: name in self.variables or self.error is not None or self._pending == 0)
            if name in self.variables:
                return self.variables[name]
            if self.error is not None:
                raise ProgramError(f"the program failed before setting {name!r}: {self.error}") from self.error
        raise KeyError(f"the program set no variable {name!r}; it has {sorted(self.variables)}")

    def set_var(self, name: str, value: Any, meta: dict[str, Any] | None = None) -> None:
        with self._cond:
            self.variables[name] = value
            if meta is not None:
                self.meta_info[name] = meta
            self._cond.notify_all()

    def set_error(self, exc: BaseException) -> None:
        with self._cond:
            if self.error is None:
                self.error = exc
            self._cond.notify_all()

    def fork(self, n: int) -> list[StreamExecutor]:
        """n branches that start from this state's text, after it has been prefilled once."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"fork(n) needs a positive int, got {n!r}")
        self.submit(_Commit())
        self.sync()
        children = []
        for i in range(n):
            child = StreamExecutor(self.backend, self.defaults, self.stream, arguments=self.arguments)
            child.branch = self.branch + (i,)
            with self._cond:
                child.text, child.messages, child.token_mark = self.text, list(self.messages), self.token_mark
                child.variables, child.meta_info = dict(self.variables), dict(self.meta_info)
                child.error, child._role, child._roles_seen = self.error, self._role, self._roles_seen
                child._scopes, child._template = dict(self._scopes), self._template
            children.append(child)
        self._children += children
        with self._cond:
            self._records.append(ForkRecord(children))
        return children

    def commit_later(self, kind: str) -> bool:
        """Queue a prefill of the text so far (recorded in the trace as `kind`); False when this
        state has ended and takes no more work."""
        with self._cond:
            if self._finished:
                return False
        self.submit(_Commit(kind))
        return True

    def join_branches(self, branches: list[StreamExecutor], fork_chars: int, mode: str) -> None:
        """Queue, for this state (the one the branches forked from, at `fork_chars`), the join's
        place in the trace and, for concate_and_append, the branches' new text in order. Call after
        the branches are synced."""
        if mode != "concate_and_append":
            with self._cond:
                if self._finished:  # a group joined after its program ended: nothing left to draw it in
                    return
            self.submit(_Join(mode, len(branches)))
            return
        first = branches[0]
        with first._cond:
            mark = first.token_mark if first.token_mark is not None and first.token_mark[0] == len(first.text) else None
        text = "".join(b.text[fork_chars:] for b in branches)
        self.submit(_Join(mode, len(branches), text, fork_chars, mark))

    def trace_records(self) -> list[TraceRecord]:
        """The calls, forks and joins of this state so far, in order."""
        with self._cond:
            return list(self._records)

    def warm_record(self) -> CallRecord | None:
        """The run_batch prefix prefill this state's wave shared, if any."""
        return self.batch_warmer.record if self.batch_warmer is not None else None

    def _record(self, kind: str, name: str | None, meta: dict[str, Any], start: float, prompt: str, output: str = "") -> None:
        record = CallRecord.from_meta(kind, name, self.branch, meta, start, time.perf_counter(), prompt, output)
        with self._cond:
            self._records.append(record)

    def wait_events(self, start: int) -> tuple[list[StreamEvent], bool]:
        """Stream events from index `start` on (waiting for at least one), and whether more may come."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.events) > start or not self._thread_alive())
            return self.events[start:], self._thread_alive() or len(self.events) > start

    def _thread_alive(self) -> bool:
        return not (self._finished and self._pending == 0)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            while True:
                item = self._queue.get()
                try:
                    if isinstance(item, _End):
                        return
                    if self.error is None:
                        self._execute(item)
                except BaseException as exc:  # noqa: BLE001 - every failure belongs to the program
                    logger.debug("program step %r failed", item, exc_info=True)
                    self.set_error(exc)
                finally:
                    with self._cond:
                        self._pending -= 1
                        self._cond.notify_all()
        finally:
            self.finished = time.perf_counter()
            if self.warmer is not None:
                self.warmer.leave(self)  # a program that never asked anything must not hold the batch

    def _before_request(self) -> None:
        if self.warmer is not None:
            warmer, self.warmer = self.warmer, None
            mark = warmer.arrive(self)
            if mark is not None and self.token_mark is None:
                self.token_mark = mark

    def _append(self, text: str, var: str | None = None) -> None:
        if not text:
            return
        with self._cond:
            self.text += text
            self.events.append(StreamEvent(text, var))
            self._cond.notify_all()

    def _chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = self.backend.chat_template()
        return self._template

    def _execute(self, item: Any) -> None:
        if isinstance(item, ir.Text):
            self._append(item.value)
        elif isinstance(item, ir.Gen):
            self._gen(item)
        elif isinstance(item, ir.Select):
            self._before_request()
            start, prompt = time.perf_counter(), self.text
            decision = self.backend.select(self, list(item.choices), item.temperature, item.choices_method)
            self._record("select", item.name, decision.meta_info, start, prompt, decision.choice)
            self._append(decision.choice, item.name)
            if item.name is not None:
                self.set_var(item.name, decision.choice, decision.meta_info)
        elif isinstance(item, ir.RoleBegin):
            template = self._chat_template()
            if self._role is not None:
                raise ValueError(f"{item.role}() begins inside an open {self._role[0]}() turn; end that turn first")
            if self._roles_seen == 0 and item.role != "system":
                self._append(template.preamble)
            self._append(template.role_prefix(item.role))
            self._role = (item.role, len(self.text))
            self._roles_seen += 1
        elif isinstance(item, ir.RoleEnd):
            if self._role is None or self._role[0] != item.role:
                raise ValueError(f"{item.role}_end() without a matching {item.role}_begin()")
            with self._cond:
                self.messages.append({"role": item.role, "content": self.text[self._role[1]:]})
            self._role = None
            self._append(self._chat_template().role_suffix(item.role))
        elif isinstance(item, ir.VarScopeBegin):
            self._scopes[item.name] = len(self.text)
        elif isinstance(item, ir.VarScopeEnd):
            self.set_var(item.name, self.text[self._scopes.pop(item.name):])
        elif isinstance(item, ir.Image):
            self.backend.check_image_support()
            raise NotImplementedError("image(): Loom's runtime serves text-only models")
        elif isinstance(item, _Commit):
            if item.kind == "join" and self.token_mark is not None and self.token_mark[0] == len(self.text):
                return  # this very text was prefilled already (a branch that added nothing)
            self._before_request()
            start = time.perf_counter()
            try:
                meta = self.backend.commit(self.text)
            except Exception:
                if item.kind != "join":
                    raise
                # The join's prefill only saves work: the parent's next request reports a real failure.
                logger.warning("join: prefilling the first branch's text failed", exc_info=True)
                return
            if meta is not None:
                self._record(item.kind, None, meta, start, self.text)
                self.token_mark = (len(self.text), int(meta["prompt_tokens"]))
        elif isinstance(item, _Join):
            with self._cond:
                self._records.append(JoinRecord(item.mode, item.size, time.perf_counter()))
            aligned = len(self.text) == item.fork_chars  # nothing appended to the parent since the fork
            self._append(item.text)
            if aligned and item.first_mark is not None:
                chars, tokens = item.first_mark
                # The next branch's text may merge with the first's last token: count one fewer.
                self.token_mark = (chars, max(tokens - 1, 0))
        else:
            raise TypeError(f"a program cannot append {type(item).__name__}: {item!r}")

    def _gen(self, item: ir.Gen) -> None:
        self._before_request()
        params = item.params.merged_over(self.defaults)
        prompt, prompt_chars = self.text, len(self.text)
        start = time.perf_counter()
        meta: dict[str, Any] = {}
        if self.stream:
            pieces = []
            for delta, meta in self.backend.generate_stream(self, params):
                pieces.append(delta)
                self._append(delta, item.name)
            out = "".join(pieces)
        else:
            out, meta = self.backend.generate(self, params)
            self._append(out, item.name)
        self._record("gen", item.name, meta, start, prompt, out)
        if "prompt_tokens" in meta:
            self.token_mark = (prompt_chars, int(meta["prompt_tokens"]))
        if item.name is not None:
            self.set_var(item.name, out, meta)


class BatchWarmer:
    """`run_batch`'s prefix warming: the first wave of programs wait at their first request
    until every one of them has arrived (or ended without a request); the last to arrive commits
    the wave's common text prefix once, and every program then finds it cached."""

    MIN_PREFIX_CHARS = 8  # a shorter common prefix is not worth a request
    WAIT_S = 600.0  # a safety net only: every program of the wave arrives or leaves

    def __init__(self, backend: Backend, wave: int) -> None:
        self.backend = backend
        self.wave = wave
        self._texts: list[str] = []
        self._gone = 0
        self._cond = threading.Condition()
        self._done = False
        self._mark: tuple[int, int] | None = None
        self.prefix = ""
        self.record: CallRecord | None = None  # the prefix prefill, for the run's trace

    def arrive(self, executor: StreamExecutor) -> tuple[int, int] | None:
        with self._cond:
            self._texts.append(executor.text)
            if len(self._texts) + self._gone < self.wave:
                self._cond.wait_for(lambda: self._done, timeout=self.WAIT_S)
                return self._mark
        self._warm()
        return self._mark

    def leave(self, executor: StreamExecutor) -> None:
        with self._cond:
            self._gone += 1
            last = len(self._texts) + self._gone == self.wave and not self._done
        if last:
            self._warm()

    def _warm(self) -> None:
        texts = self._texts
        prefix = texts[0] if texts else ""
        for t in texts[1:]:
            n = 0
            while n < min(len(prefix), len(t)) and prefix[n] == t[n]:
                n += 1
            prefix = prefix[:n]
        try:
            if len(texts) > 1 and len(prefix) >= self.MIN_PREFIX_CHARS:
                start = time.perf_counter()
                meta = self.backend.commit(prefix)
                if meta is not None:
                    self.record = CallRecord.from_meta("warm", None, (), meta, start, time.perf_counter(), prefix)
                    self.prefix = prefix
                    # Tokens right at a cut mid-word may merge differently in the full text.
                    self._mark = (len(prefix), max(int(meta["prompt_tokens"]) - 1, 0))
        except Exception:  # warming is an optimisation: each program's own request reports the failure
            logger.warning("run_batch: warming the shared prefix failed", exc_info=True)
        finally:
            with self._cond:
                self._done = True
                self._cond.notify_all()
