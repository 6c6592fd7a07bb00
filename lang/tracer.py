"""`Program.trace`: the expressions a program appends, collected without a backend."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loom.lang import ir

if TYPE_CHECKING:
    from loom.lang.program import Program


class TracingState:
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

    def _role(self, role: str, expr: ir.ExprLike | None) -> Any:
        if expr is not None:
            self += ir.RoleBegin(role) + expr + ir.RoleEnd(role)
            return None
        return _Scope(self, ir.RoleBegin(role), ir.RoleEnd(role))

    def system(self, expr: ir.ExprLike | None = None) -> Any:
        return self._role("system", expr)

    def user(self, expr: ir.ExprLike | None = None) -> Any:
        return self._role("user", expr)

    def assistant(self, expr: ir.ExprLike | None = None) -> Any:
        return self._role("assistant", expr)

    def var_scope(self, name: str) -> _Scope:
        return _Scope(self, ir.VarScopeBegin(name), ir.VarScopeEnd(name))

    def fork(self, size: int = 1, position_ids_offset: Any = None) -> list[TracingState]:
        raise NotImplementedError("trace() does not follow fork(); trace the branches' programs on their own")


class _Scope:
    def __init__(self, state: TracingState, begin: ir.Expr, end: ir.Expr) -> None:
        self.state, self.begin, self.end = state, begin, end

    def __enter__(self) -> None:
        self.state += self.begin

    def __exit__(self, *exc: Any) -> None:
        self.state += self.end


def trace_program(program: Program, arguments: dict[str, Any]) -> list[ir.Expr]:
    state = TracingState()
    program.func(state, **arguments)
    return state.nodes
