"""`s`, the program state a program writes to, and the group `s.fork(n)` returns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import loom.lang.ir as ir
from loom.lang.interpreter import StreamExecutor
from loom.lang.run_trace import RunTrace


class ProgramState(ir.RoleWriter):
    """What a program appends to (`s += ...`) and reads from (`s["name"]`, `s.text()`)."""

    def __init__(self, executor: StreamExecutor) -> None:
        self.stream_executor = executor
        self.ret_value: Any = None

    # ------------------------------------------------------------------ writing
    def __iadd__(self, other: ir.ExprLike) -> ProgramState:
        for leaf in ir.flatten(ir.as_expr(other)):
            self.stream_executor.submit(leaf)
        return self

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> ForkGroup:
        """`size` branches that continue from the text so far. The shared text is prefilled once
        first, so every branch's first request finds it in the cache."""
        del position_ids_offset  # SGLang's argument; branches here always continue at the end
        return ForkGroup([ProgramState(e) for e in self.stream_executor.fork(size)], self)

    # ------------------------------------------------------------------ reading
    def __getitem__(self, name: str) -> Any:
        """The variable `name`, once the program has produced it."""
        return self.stream_executor.get_var(name)

    def get_var(self, name: str) -> Any:
        return self.stream_executor.get_var(name)

    def __setitem__(self, name: str, value: Any) -> None:
        self.stream_executor.set_var(name, value)

    set_var = __setitem__

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self.stream_executor.variables

    def get_meta_info(self, name: str) -> dict[str, Any]:
        """The runtime's meta_info of the gen/select `name` (prompt_tokens, cached_tokens, ...)."""
        self.stream_executor.get_var(name)
        return self.stream_executor.meta_info.get(name, {})

    def text(self) -> str:
        self.sync()
        return self.stream_executor.text

    def messages(self) -> list[dict[str, Any]]:
        """The chat turns so far, OpenAI style: [{"role": ..., "content": ...}]."""
        self.sync()
        return list(self.stream_executor.messages)

    def error(self) -> BaseException | None:
        """What made the program fail (an exception in its body or a failed request), or None."""
        self.sync()
        return self.stream_executor.error

    def sync(self) -> None:
        self.stream_executor.sync()

    def trace(self, title: str = "Loom run") -> RunTrace:
        """A picture of this finished run: its fork tree, each gen/select with its prompt, cached and
        new tokens and its time. `state.trace().save("run.html")`; for a whole run_batch,
        `RunTrace.of(states)`. (`Program.trace(**kwargs)` is another thing: the expressions a
        program would append, collected without running it.)"""
        return RunTrace.of(self, title)

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The program's text as it is produced (with `run(stream=True)`, token by token); with
        `var_name`, only what that gen/select produces."""
        seen = 0
        while True:
            events, more = self.stream_executor.wait_events(seen)
            seen += len(events)
            for event in events:
                if var_name is None or event.var == var_name:
                    yield event.text
            if not more:
                return

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator[Any]:
        """`text_iter` for asyncio code: waiting happens on a worker thread, not the event loop."""
        it = self.text_iter(var_name)
        done = object()
        while True:
            piece = await asyncio.to_thread(next, it, done)
            if piece is done:
                return
            if return_meta_data:
                yield piece, self.stream_executor.meta_info.get(var_name, {}) if var_name else {}
            else:
                yield piece

    def __repr__(self) -> str:
        return f"ProgramState({self.text()!r})"


class ForkGroup:
    """The branches of one `fork`: `group += x` appends to each (a list or a function of the
    branch index gives each its own), `group[i]` is one branch, `join()` brings results back."""

    def __init__(self, states: list[ProgramState], parent: ProgramState) -> None:
        self.states = states
        self.parent = parent
        self._parent_vars = set(parent.stream_executor.variables)
        self._fork_text = len(parent.stream_executor.text)

    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self.states)

    def __getitem__(self, i: int) -> ProgramState:
        return self.states[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        # `forks[i] += x` re-assigns the same state; anything else is a mistake.
        if value is not self.states[i]:
            raise TypeError("assign to a fork only through `forks[i] += ...`")

    def __iadd__(self, other: Any) -> ForkGroup:
        if isinstance(other, (list, tuple)):
            if len(other) != len(self.states):
                raise ValueError(f"appending a list to {len(self.states)} forks needs {len(self.states)} items, got {len(other)}")
            for state, item in zip(self.states, other):
                state += item
        elif callable(other) and not isinstance(other, ir.Expr):
            fn: Callable[[int], Any] = other
            for i, state in enumerate(self.states):
                state += fn(i)
        else:
            for state in self.states:
                state += other
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """gather_variable: each variable the branches set becomes, in the parent, the list of the
        branches' values. concate_and_append: the branches' new text is appended to the parent's,
        branch by branch (SGLang's text), and the first branch's whole text is prefilled first, so
        the parent's next request hits the cache for it.

        SGLang's own concate_and_append asks the server to splice the branches' KV together. Loom's
        radix cache holds only exact KV (each token's KV given every token before it), and a later
        branch's KV was computed without the earlier branches' text before it (other attention,
        other positions), so only the first branch's tokens can be reused as they are."""
        if mode not in ("gather_variable", "concate_and_append"):
            raise ValueError(f"join(mode) must be 'gather_variable' or 'concate_and_append', got {mode!r}")
        if mode == "concate_and_append":
            # The parent goes on with the first branch's whole text: prefill it (prefix-cached up
            # to what the branch computed) so the parent's next request finds all of it cached.
            self.states[0].stream_executor.commit_later("join")
        for state in self.states:
            state.sync()
        parent = self.parent.stream_executor
        failed = next((s.stream_executor.error for s in self.states if s.stream_executor.error is not None), None)
        if failed is not None:
            parent.set_error(failed)
        if mode == "gather_variable":
            names: list[str] = []
            for state in self.states:
                names += [k for k in state.stream_executor.variables if k not in self._parent_vars and k not in names]
            for name in names:
                values = [s.stream_executor.variables.get(name) for s in self.states]
                metas = [s.stream_executor.meta_info.get(name, {}) for s in self.states]
                parent.set_var(name, values, {"forks": metas})
        parent.join_branches([s.stream_executor for s in self.states], self._fork_text, mode)
        for state in self.states:
            state.stream_executor.end()
