"""Plain Lark grammars read without Lark: the subset JSON-Schema grammars are written in.

    plain_lark(text) -> PlainLark(bodies, terminals) | None   (None: outside the subset, Lark reads it)

A JSON Schema the regex path refuses becomes a Lark grammar (schema_grammar.py) of rules over named
terminals whose automata come with it: `name: a B (c | D)? e*` and `NAME: "literal"` lines, nothing
else. Lark's loader and compiler took ~8 ms of such a schema's ~12 ms compile. This reads exactly
that subset into the trees Lark's parser makes of it (ebnf_bnf.Node), for ebnf_bnf.to_bnf and
lalr.py, which give Lark's rules and tables (tested against Lark on random plain grammars). A
grammar using anything more (literals or regexes in rules, `[...]`, `~`, `->`, rule modifiers or
priorities, `%` statements, comments) or with an undefined, duplicate or unused name is left to
Lark, which reads it or says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loom.runtime.constrained.ebnf_bnf import Node

_RULE = re.compile(r"[a-z][a-z0-9_]*")
_TERMINAL = re.compile(r"[A-Z][A-Z0-9_]*")
_LINE = re.compile(r"([A-Za-z][A-Za-z0-9_]*):(.*)")
_LITERAL = re.compile(r' *"([a-z0-9_]+)" *')
_TOKEN = re.compile(r" *([A-Za-z][A-Za-z0-9_]*|[()|?*+])")


@dataclass(frozen=True, slots=True)
class PlainLark:
    bodies: dict[str, Node]  # rule -> its `expansions` tree, as Lark parses it
    terminals: dict[str, str]  # terminal -> its literal


def plain_lark(text: str) -> PlainLark | None:
    """The rules and terminals of a plain Lark grammar, or None where it is not one."""
    bodies: dict[str, Node] = {}
    terminals: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            return None
        name, rest = m.groups()
        if name in bodies or name in terminals:
            return None
        if _TERMINAL.fullmatch(name):
            lit = _LITERAL.fullmatch(rest)
            if lit is None:
                return None
            terminals[name] = lit.group(1)
        elif _RULE.fullmatch(name):
            tokens = _tokens(rest)
            body = _Reader(tokens).body() if tokens is not None else None
            if body is None:
                return None
            bodies[name] = body
        else:
            return None
    used = {s for body in bodies.values() for s in _symbols(body)}
    if "start" not in bodies or not used <= bodies.keys() | terminals.keys() or not terminals.keys() <= used:
        return None
    return PlainLark(bodies, terminals)


def _tokens(text: str) -> list[str] | None:
    out, at = [], 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            return None if text[at:].strip() else out
        out.append(m.group(1))
        at = m.end()
    return out


def _symbols(node: Node):
    for c in node.children:
        if isinstance(c, Node):
            yield from _symbols(c)
        elif c not in ("?", "*", "+"):
            yield c


class _Reader:
    """expansions: expansion ("|" expansion)*; expansion: expr*; expr: atom [?*+]; atom: NAME | "(" expansions ")"."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.at = 0

    def _peek(self) -> str | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def body(self) -> Node | None:
        tree = self._expansions()
        return tree if tree is not None and self.at == len(self.tokens) else None

    def _expansions(self) -> Node | None:
        alternatives = []
        while True:
            items = []
            while self._peek() not in (None, "|", ")"):
                item = self._expr()
                if item is None:
                    return None
                items.append(item)
            alternatives.append(Node("expansion", items))
            if self._peek() != "|":
                return Node("expansions", alternatives)
            self.at += 1

    def _expr(self) -> Node | str | None:
        tok = self._peek()
        self.at += 1
        if tok == "(":
            atom = self._expansions()
            if atom is None or self._peek() != ")":
                return None
            self.at += 1
        elif tok is not None and tok not in ("?", "*", "+", "|", ")"):
            atom = tok
        else:
            return None
        if self._peek() in ("?", "*", "+"):
            op = self._peek()
            self.at += 1
            return Node("expr", [atom, op])
        return atom
