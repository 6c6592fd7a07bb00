"""`@function` programs and how they run: `run`, `run_batch`, `bind`, `trace`."""

from __future__ import annotations

import concurrent.futures
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import loom.lang.ir as ir
from loom.lang.backend.base import Backend
from loom.lang.interpreter import BatchWarmer, StreamExecutor
from loom.lang.state import ProgramState

_default_backend: Backend | None = None


def set_default_backend(backend: Backend | None) -> None:
    """The backend `run` and `run_batch` use when they are not given one."""
    global _default_backend
    _default_backend = backend


def get_default_backend() -> Backend | None:
    return _default_backend


def _backend(backend: Backend | None) -> Backend:
    backend = backend or _default_backend
    if backend is None:
        raise ValueError("no backend: pass backend=... or call set_default_backend(RuntimeEndpoint(url)) first")
    return backend


def _defaults(**kwargs: Any) -> ir.SamplingParams:
    return ir.SamplingParams(**kwargs).merged_over(ir.DEFAULT_SAMPLING)


class Program:
    """A prompt program: a Python function whose first argument is the state `s`."""

    def __init__(self, func: Callable[..., Any], bind_arguments: dict[str, Any] | None = None) -> None:
        params = list(inspect.signature(func).parameters)
        if not params or params[0] != "s":
            raise TypeError(f"a @function program takes the state `s` as its first argument; {func.__name__}{inspect.signature(func)} does not")
        self.func = func
        self.arg_names = params[1:]
        self.bind_arguments = bind_arguments or {}
        self.__name__ = func.__name__
        self.__doc__ = func.__doc__

    def bind(self, **kwargs: Any) -> Program:
        """A copy with some arguments fixed."""
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__}() has no argument(s) {sorted(unknown)}; it takes {self.arg_names}")
        return Program(self.func, {**self.bind_arguments, **kwargs})

    def __call__(self, *args: Any, **kwargs: Any) -> ProgramState:
        return self.run(*args, **kwargs)

    def run(self, *args: Any, max_new_tokens: int = 128, min_new_tokens: int = 0, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1,
            min_p: float = 0.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
            return_logprob: bool | None = None, logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
            return_text_in_logprobs: bool | None = None, stream: bool = False, backend: Backend | None = None,
            use_thread: bool = True, **kwargs: Any) -> ProgramState:  # fmt: skip
        """Run the program once and return its state.

        The sampling arguments are the defaults of every `gen` in it. stream=False: returns when
        the program is done. stream=True: returns at once; read the text with `text_iter()`.
        An exception in the program's body is raised here (and kept in `state.error()`); a failed
        request is kept in `state.error()` and raised by whatever reads a value it would have set."""
        del use_thread  # SGLang's argument; programs always run on threads here
        defaults = _defaults(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop=stop, stop_token_ids=stop_token_ids,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        arguments = self._arguments(args, kwargs)
        executor = StreamExecutor(_backend(backend), defaults, stream, arguments=arguments)
        state = ProgramState(executor)
        if stream:
            import threading

            threading.Thread(target=self._body, args=(state, arguments, False), daemon=True, name="loom-program-body").start()
            return state
        self._body(state, arguments, True)
        return state

    def run_batch(self, batch_kwargs: list[dict[str, Any]], *, max_new_tokens: int = 128, min_new_tokens: int = 0,
                  stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, temperature: float = 1.0,
                  top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, ignore_eos: bool = False, return_logprob: bool | None = None,
                  logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                  return_text_in_logprobs: bool | None = None, backend: Backend | None = None,
                  num_threads: int | str = "auto", progress_bar: bool = False,
                  generator_style: bool = False) -> list[ProgramState] | Iterator[ProgramState]:  # fmt: skip
        """Run the program once per kwargs dict, `num_threads` at a time; the states in order.

        A program that fails does not stop the others: its state's `error()` says why. The common
        text prefix of the first programs' first requests is prefilled once before they go on, so
        all of them hit the cache. With `generator_style=True` the programs start at once and an
        iterator yields each state, in order, as soon as it and the ones before it are done."""
        if not isinstance(batch_kwargs, (list, tuple)) or not all(isinstance(k, dict) for k in batch_kwargs):
            raise TypeError("run_batch takes a list of keyword-argument dicts, one per program run")
        if not batch_kwargs:
            return []
        backend = _backend(backend)
        defaults = _defaults(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, stop=stop, stop_token_ids=stop_token_ids,
            temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty, ignore_eos=ignore_eos, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs,
        )  # fmt: skip
        if num_threads == "auto":
            num_threads = max(64, (os.cpu_count() or 1) * 8)
        if not isinstance(num_threads, int) or num_threads < 1:
            raise ValueError(f"num_threads must be a positive int or 'auto', got {num_threads!r}")
        num_threads = min(num_threads, len(batch_kwargs))
        # Pool workers start the first `num_threads` programs at once: they form the warming wave.
        warmer = BatchWarmer(backend, num_threads) if num_threads > 1 else None
        states = []
        for i, kwargs in enumerate(batch_kwargs):
            arguments = self._arguments((), dict(kwargs))
            executor = StreamExecutor(backend, defaults, False, warmer if i < num_threads else None, arguments)
            states.append(ProgramState(executor))

        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(states), desc=self.__name__)
        pool = concurrent.futures.ThreadPoolExecutor(num_threads, thread_name_prefix="loom-batch")
        futures = [pool.submit(self._body, s, s.stream_executor.arguments, False) for s in states]
        if bar is not None:
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))

        def finish() -> None:
            pool.shutdown(wait=True)
            if bar is not None:
                bar.close()

        if generator_style:
            return _in_order(states, futures, finish)
        for future in futures:
            future.result()  # _body keeps failures in the state; this only surfaces bugs here
        finish()
        return states

    def trace(self, *, backend: Backend | None = None, **kwargs: Any) -> list[ir.Expr]:
        """The expressions the program appends, without running any of them. Values read from the
        state inside the program are placeholders (`<name>`)."""
        from loom.lang.tracer import trace_program

        return trace_program(self, self._arguments((), kwargs))

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if len(args) > len(self.arg_names):
            raise TypeError(f"{self.__name__}() takes {len(self.arg_names)} argument(s) besides `s`, got {len(args)}")
        arguments = {**self.bind_arguments, **dict(zip(self.arg_names, args)), **kwargs}
        unknown = set(arguments) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.__name__}() got unexpected argument(s) {sorted(unknown)}; it takes {self.arg_names}")
        return arguments

    def _body(self, state: ProgramState, arguments: dict[str, Any], reraise: bool) -> None:
        executor = state.stream_executor
        try:
            state.ret_value = self.func(state, **arguments)
        except BaseException as exc:
            executor.set_error(exc)
            if reraise:
                raise
        finally:
            executor.end()
            executor.join_thread()


def function(func: Callable[..., Any] | None = None, *, num_api_spec_tokens: int | None = None) -> Any:
    """`@function` (or `@function()`) turns `def f(s, ...)` into a `Program`."""
    del num_api_spec_tokens  # SGLang's speculative API calls; not needed for a native backend

    def wrap(f: Callable[..., Any]) -> Program:
        return Program(f)

    return wrap(func) if func is not None else wrap


def _in_order(
    states: list[ProgramState], futures: list[concurrent.futures.Future], finish: Callable[[], None]
) -> Iterator[ProgramState]:
    """run_batch(generator_style=True): each state once its program (and every earlier one) is done."""
    try:
        for state, future in zip(states, futures):
            future.result()
            yield state
    finally:
        finish()
