"""Compilations that stop: a thread pool whose jobs are cancelled when they run past their time
budget or when nobody waits for them any more.

    jobs = CompileJobs(max_workers)
    ticket = jobs.submit(key, fn, timeout_s)   a Future of fn()'s result; the same key in flight shares one run
    jobs.cancel(key)                            stop it now (its tickets fail with CompileStopped, a GrammarError)

A job is wanted while some caller holds one of its tickets (they are held weakly here): when the
scheduler drops a request (aborted, answered, timed out), its ticket goes with it, and a job whose
tickets are all gone is stopped. Stopping a Python thread is done the way a debugger does it: an
exception (`CompileCancelled`) is raised inside the thread at its next bytecode, so the LALR table
construction and numpy loops stop too, not only code that checks a flag. The exception is only
ever raised inside the job it was aimed at (a job records the thread that runs it, and the
thread clears what is pending before it takes the next job). Python cannot raise out of a finaliser
(`__del__`, a weakref or gc callback): one that a stop lands in reports it to `sys.unraisablehook`
and carries on, so the watchdog raises it again until the thread has left the job, and a filter on
that hook keeps those reports quiet (they are part of stopping, not errors).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from loom.runtime.constrained.errors import ErrorKind, GrammarError

WATCH_INTERVAL_S = 0.02  # how often running jobs are checked for their deadline and their tickets
# Compile threads run at a lower CPU priority than the scheduler's: on a CPU host the model's
# intra-op threads take every core, and a compile competing with them at equal priority made
# 4-token requests 10x slower (benchmarks/bench_grammar_stall.py).
COMPILE_NICE = 5


class CompileStopped(GrammarError):
    """The error a stopped job's futures get (kind TOO_LARGE): not the grammar's final answer, so
    it is not cached; the message says why it stopped."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ErrorKind.TOO_LARGE)

    def __reduce__(self) -> tuple[type[CompileStopped], tuple[str]]:
        return type(self), (str(self),)


class CompileCancelled(BaseException):
    """Raised inside a compile thread to stop it (a BaseException: `except Exception` in the
    compilers does not swallow it)."""


def _raise_in_thread(thread_id: int, exc: type[BaseException] | None) -> None:
    """Make `exc` pending in the thread (None: drop what is pending)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)


class _Job:
    __slots__ = ("key", "fn", "timeout_s", "future", "tickets", "deadline", "thread_id", "cancelled", "__weakref__")

    def __init__(self, key: Hashable, fn: Callable[[], Any], timeout_s: float) -> None:
        self.key = key
        self.fn = fn
        self.timeout_s = timeout_s
        self.future: Future = Future()
        self.tickets: weakref.WeakSet[Future] = weakref.WeakSet()
        self.deadline: float | None = None  # set when it starts running
        self.thread_id: int | None = None
        self.cancelled: str | None = None  # why it was stopped


class CompileJobs:
    """A thread pool for compilations, with a watchdog that stops the unwanted and the overdue."""

    def __init__(self, max_workers: int) -> None:
        _quiet_stops_in_finalisers()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="loom-grammar", initializer=_compile_thread)
        self._lock = threading.Lock()
        self._jobs: dict[Hashable, _Job] = {}  # in flight (queued or running)
        self._stopping: list[_Job] = []  # stopped, their thread not yet out of them
        self._wake = threading.Event()
        self._closed = False
        self._watchdog: threading.Thread | None = None
        self.cancelled_count = 0  # jobs stopped before they finished (for tests and stats)

    def submit(self, key: Hashable, fn: Callable[[], Any], timeout_s: float) -> Future:
        """A ticket: a Future of fn()'s result (or its exception). Callers must keep the ticket while
        they want the result; a job whose tickets are all dropped is stopped."""
        ticket: Future = Future()
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.cancelled:
                job = self._jobs[key] = _Job(key, fn, timeout_s)
                self._pool.submit(self._run, job)
            job.tickets.add(ticket)
            ref = weakref.ref(ticket)
            job.future.add_done_callback(lambda f: _settle(ref(), f))
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, name="loom-grammar-watchdog", daemon=True)
                self._watchdog.start()
        self._wake.set()
        return ticket

    def in_flight(self) -> int:
        with self._lock:
            return len(self._jobs)

    def cancel(self, key: Hashable, why: str = "cancelled") -> bool:
        """Stop the job of `key` if it is in flight; its tickets fail. True if there was one."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None:
                return False
            self._stop(job, why)
            return True

    def _stop(self, job: _Job, why: str) -> None:
        """(holding _lock) Mark the job stopped and raise CompileCancelled in its thread if it runs."""
        if job.cancelled:
            return
        job.cancelled = why
        self.cancelled_count += 1
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]
        if job.thread_id is not None:
            _raise_in_thread(job.thread_id, CompileCancelled)
            self._stopping.append(job)
        elif not job.future.done():  # still queued: it will see `cancelled` and not start
            job.future.set_exception(CompileStopped(why))

    def _run(self, job: _Job) -> None:
        tid = threading.get_ident()
        with self._lock:
            if job.cancelled:
                return
            job.thread_id = tid
            job.deadline = time.monotonic() + job.timeout_s
        result: Any = None
        error: BaseException | None = None
        try:
            result = job.fn()
        except CompileCancelled:
            error = None
        except BaseException as e:  # noqa: BLE001 - handed to the waiting requests
            error = e
        # Leave the job so that the watchdog can no longer aim at this thread, then drop anything it
        # made pending meanwhile. The exception may still fire in between: absorb it and redo both.
        while True:
            try:
                with self._lock:
                    job.thread_id = None
                    if self._jobs.get(job.key) is job:
                        del self._jobs[job.key]
                _raise_in_thread(tid, None)
                break
            except CompileCancelled:
                continue
        if job.cancelled:
            job.future.set_exception(CompileStopped(job.cancelled)) if not job.future.done() else None
        elif error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    def _watch(self) -> None:
        while not self._closed:
            self._wake.wait(WATCH_INTERVAL_S)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                # An exception raised inside a __del__ or a weakref callback is printed and dropped
                # by Python: raise it again in threads that are still inside a stopped job.
                self._stopping = [job for job in self._stopping if job.thread_id is not None]
                for job in self._stopping:
                    _raise_in_thread(job.thread_id, CompileCancelled)
                for job in list(self._jobs.values()):
                    if not job.tickets:
                        self._stop(job, "compilation stopped: no request waits for it any more")
                    elif job.deadline is not None and now > job.deadline:
                        self._stop(job, f"took longer than {job.timeout_s:g}s to compile; simplify it")
                idle = not self._jobs and not self._stopping
            if idle:
                self._wake.wait(1.0)

    def shutdown(self) -> None:
        self._closed = True
        with self._lock:
            for job in list(self._jobs.values()):
                self._stop(job, "the grammar backend is shutting down")
        self._wake.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _unraisable_filter(args: Any) -> None:
    """sys.unraisablehook: a stop that landed in a finaliser is not reported (the watchdog raises it
    again); anything else goes on to the hook that was there before."""
    if isinstance(args.exc_type, type) and issubclass(args.exc_type, CompileCancelled):
        return
    _unraisable_filter.previous(args)  # type: ignore[attr-defined]


def _quiet_stops_in_finalisers() -> None:
    """Put the filter in front of whatever sys.unraisablehook is now (once; again if replaced)."""
    if sys.unraisablehook is not _unraisable_filter:
        _unraisable_filter.previous = sys.unraisablehook  # type: ignore[attr-defined]
        sys.unraisablehook = _unraisable_filter


def _compile_thread() -> None:
    """A new compile thread: a lower priority and single-threaded torch ops."""
    _lower_priority()
    _one_openmp_thread()


def _lower_priority() -> None:
    """Make this (new compile) thread yield the CPU to the scheduler's (Linux: niceness is per thread)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + COMPILE_NICE))
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the same priority
        pass


def _settle(ticket: Future | None, done: Future) -> None:
    if ticket is None or ticket.done():
        return
    exc = done.exception()
    if exc is None:
        ticket.set_result(done.result())
    else:
        ticket.set_exception(exc)


def _one_openmp_thread() -> None:
    """Run this thread's torch ops on itself alone. A parallel region started from a second thread gives
    the process a second OpenMP team; with more OpenMP threads than cores, libgomp stops spinning for
    every team, and the scheduler's threads sleep and wake around each of the model's parallel
    regions: one xgrammar compile (which packs a vocabulary-sized mask with torch) left decoding 25%
    slower in the whole process (benchmarks/bench_grammar_first_token.py's batch)."""
    lib = _openmp_runtime()
    if lib is None:
        return
    import torch

    torch.get_num_threads()  # torch sets a thread's OpenMP thread count on its first use there: first, so this one holds
    lib.omp_set_num_threads(1)  # this thread's own setting (an OpenMP ICV is per thread)


@functools.cache
def _openmp_runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on (libgomp, or LLVM's / Intel's), where one is loaded."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/lib" in line}
    except OSError:  # not Linux
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None
