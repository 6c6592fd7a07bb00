"""`Program.trace`: the expressions a program appends, collected without a backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import loom.lang.ir as ir

if TYPE_CHECKING:
    from loom.lang.program import Program


class TracingState(ir.RoleWriter):
    """Stands in for `s`: records what is appended; reads give placeholders."""

    def __init__(self) -> None:
        self.nodes: list[ir.Expr] = []

    def __iadd__(self, other: ir.ExprLike) -> TracingState:
        self.nodes += ir.flatten(ir.as_expr(other))
        return self

    def __getitem__(self, name: str) -> str:
        return f"<{name}>"

    def get_var(self, name: str) -> str:
        return self[name]

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> list[TracingState]:
        raise NotImplementedError("trace() does not follow fork(); trace the branches' programs on their own")


def trace_program(program: Program, arguments: dict[str, Any]) -> list[ir.Expr]:
    state = TracingState()
    program.func(state, **arguments)
    return state.nodes
