"""Lark grammars read without Lark's grammar loader: the syntax nearly every grammar is written in.

    plain_lark(text) -> PlainLark | None   (None: something outside the subset; Lark reads it)
    PlainLark.compile() -> (terminals [(name, regex)], rules [lalr.Rule], ignored names)

Lark's loader parses a grammar with its own LALR parser, then runs a dozen tree transformers
over it: ~5 ms of a JSON grammar's ~9.5 ms compile. This reads the common subset straight into
the trees Lark's parser makes (ebnf_bnf.Node) and compiles them as Lark's `Grammar.compile`
does, reusing Lark's own small pieces (its literal unescaping, its Pattern classes, its names for
anonymous terminals), so that the terminals, the rules and so the tables are Lark's (tested
against Lark on random grammars and on known ones):

- rules `name: ...`, with `?` / `!` modifiers and a `.n` priority; terminals `NAME: ...` with a
  `.n` priority; alternatives over lines (`|`), comments (`//`, `#`);
- `"literal"` and `/regex/` with flags, `"a".."z"`, names, `( )`, `[ ]`, `? * +`, `~ n`,
  `~ n..m`, and `-> alias` on a rule's alternatives;
- `%ignore NAME`, `%import lib.NAME` and `%import lib (NAME, ...)` of Lark's library terminals.

Anything else (templates, `%declare` / `%override` / `%extend`, relative or aliased imports, an
`%ignore` of an expression, a backslash continuation), and any grammar Lark would refuse or where
the two could differ (an undefined, duplicate or reserved name, a rule in a terminal, a recursive
or empty terminal, a bad range), is left to Lark, which reads it or says what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lark import Token
from lark.exceptions import GrammarError as LarkGrammarError
from lark.lexer import Pattern, PatternRE, PatternStr

try:  # (Lark's own pieces, not its public API: a Lark without them reads every grammar itself)
    from lark.load_grammar import _TERMINAL_NAMES, _literal_to_pattern, eval_escaping
    from lark.utils import is_id_continue, is_id_start
except ImportError:  # pragma: no cover
    _TERMINAL_NAMES = None

from loom.runtime.constrained.ebnf_bnf import Filtered, Node, subtrees, to_bnf
from loom.runtime.constrained.lalr import Rule
from loom.runtime.constrained.lark_imports import library_pattern

_TOKEN = re.compile(
    r"""(?P<skip>[ \t]+|(?://|\#)[^\n]*)
    |(?P<nl>(?:\r?\n[ \t]*|(?://|\#)[^\n]*)+)
    |(?P<string>"(?:\\"|\\\\|[^"\n])*?"i?)
    |(?P<regexp>/(?!/)(?:\\/|\\\\|[^/])*?/[imslux]*)
    |(?P<mods>(?:![?]?|[?]!?)(?=[_a-z]))
    |(?P<name>_?[a-z][_a-z0-9]*|_?[A-Z][_A-Z0-9]*)
    |(?P<number>[+-]?\d+)
    |(?P<directive>%[a-z]+)
    |(?P<punct>->|\.\.|[():\[\]|~.,+*?])""",
    re.X,
)
_WORD = re.compile(r"[A-Za-z0-9_]")
_ENDS = (("punct", "|"), ("punct", ")"), ("punct", "]"), ("punct", "->"))  # what ends a sequence (as a line break does)


class _NotPlain(Exception):
    """Outside the subset (or an error Lark should report): Lark reads the grammar."""


@dataclass(frozen=True, slots=True)
class _Literal:
    kind: str  # "STRING" | "REGEXP"
    raw: str  # as written, quotes and flags included


@dataclass(frozen=True, slots=True)
class _Range:
    first: str  # "a" as written
    last: str


@dataclass(slots=True)
class PlainLark:
    rules: dict[str, Node]  # rule -> its `expansions` tree (literals still _Literal / _Range leaves)
    terminals: dict[str, Node]  # terminal -> its tree
    imports: dict[str, Pattern]  # imported terminal -> its pattern, in Lark's order (before the grammar's own)
    ignore: list[str]
    keep_all: frozenset[str]  # rules marked `!`
    priorities: dict[str, int]  # rules with `.n`

    def compile(self) -> tuple[list[tuple[str, str]], list[Rule], list[str]] | None:
        """Lark's `Grammar.compile`: (terminals (name, regex), BNF rules, ignored), or None where
        Lark would refuse the grammar (it then says why). to_bnf's refusals (too many
        alternatives, rules twice) are raised."""
        try:
            patterns = dict(self.imports)
            for name in self.terminals:
                patterns[name] = _pattern(self.terminals[name], self.terminals, patterns, set())
            named = _AnonymousTerminals(patterns)
            bodies = {name: _resolve(tree, named) for name, tree in self.rules.items()}
        except (_NotPlain, LarkGrammarError, AssertionError, RecursionError):  # (a chain of thousands of terminals: Lark's loop)
            return None
        rules = _used_rules(to_bnf(bodies, self.keep_all, self.priorities))
        used = {s for r in rules for s in r.expansion if s.isupper()} | set(self.ignore)
        terminals = [(name, p.to_regexp()) for name, p in named.patterns.items() if name in used]
        return terminals, rules, list(self.ignore)


def plain_lark(text: str) -> PlainLark | None:
    """The definitions of a Lark grammar in the subset, or None where it is not in it."""
    if _TERMINAL_NAMES is None:
        return None
    try:
        return _Reader(_tokens(text)).grammar()
    except _NotPlain:
        return None


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) pairs; a line break followed by `|` is an `|` (Lark's _NL_OR), other line breaks
    end a statement ("nl")."""
    out: list[tuple[str, str]] = []
    at = 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            raise _NotPlain
        kind, value, at = m.lastgroup, m.group(), m.end()
        if kind == "skip":
            continue
        if kind == "nl":
            if text.startswith("|", at):
                kind, value, at = "punct", "|", at + 1
            elif out and out[-1][0] == "nl":
                continue
        elif kind in ("name", "string", "regexp", "number") and _WORD.match(text, at):
            raise _NotPlain  # (`Aa`, `"x"y`: what Lark makes of these is not worth mirroring)
        out.append((kind, value))
    out.append(("nl", ""))
    return out


class _Reader:
    """Statements: `[mods] name [.n] : expansions`, `NAME [.n] : expansions`, `%ignore NAME`, `%import`."""

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.tokens = tokens
        self.at = 0

    def _peek(self) -> tuple[str, str]:
        return self.tokens[self.at]

    def _take(self, kind: str, value: str | None = None) -> str:
        k, v = self.tokens[self.at]
        if k != kind or (value is not None and v != value):
            raise _NotPlain
        self.at += 1
        return v

    def grammar(self) -> PlainLark:
        rules: dict[str, Node] = {}
        terminals: dict[str, Node] = {}
        imports: dict[tuple[str, ...], dict[str, None]] = {}  # library -> names, in Lark's order
        ignore: list[str] = []
        keep_all: set[str] = set()
        priorities: dict[str, int] = {}
        while self.at < len(self.tokens):
            kind, value = self._peek()
            if kind == "nl":
                self.at += 1
            elif kind == "directive":
                self.at += 1
                if value == "%ignore":
                    ignore.append(self._take("name"))
                    if not ignore[-1].isupper():
                        raise _NotPlain
                elif value == "%import":
                    library, names = self._import()
                    imports.setdefault(library, {}).update(dict.fromkeys(names))
                else:
                    raise _NotPlain
                self._take("nl")
            else:
                mods = self._take("mods") if kind == "mods" else ""
                name = self._take("name")
                if self._peek() == ("punct", "."):
                    self.at += 1
                    priority = int(self._take("number"))
                    if not name.isupper():
                        priorities[name] = priority
                self._take("punct", ":")
                body = self._expansions(top=True)
                self._take("nl")
                if name in rules or name in terminals or name.startswith("__"):
                    raise _NotPlain
                if name.isupper():
                    if mods:
                        raise _NotPlain
                    terminals[name] = body
                else:
                    if "?" in mods and name.startswith("_"):
                        raise _NotPlain
                    if "!" in mods:
                        keep_all.add(name)
                    rules[name] = body
        imported: dict[str, Pattern] = {}
        for library, names in imports.items():
            for name in names:
                pattern = library_pattern(library, name)
                if pattern is None or name in imported:
                    raise _NotPlain
                imported[name] = pattern
        defined = rules.keys() | terminals.keys() | imported.keys()
        used = {s for tree in [*rules.values(), *terminals.values()] for s in _names(tree)}
        if "start" not in rules or not used <= defined or not set(ignore) <= defined or imported.keys() & (rules.keys() | terminals.keys()):
            raise _NotPlain
        return PlainLark(rules, terminals, imported, ignore, frozenset(keep_all), priorities)

    def _import(self) -> tuple[tuple[str, ...], list[str]]:
        path = [self._take("name")]
        while self._peek() == ("punct", "."):
            self.at += 1
            path.append(self._take("name"))
        if self._peek() == ("punct", "("):  # `%import lib (A, B)`
            self.at += 1
            names = [self._take("name")]
            while self._peek() == ("punct", ","):
                self.at += 1
                names.append(self._take("name"))
            self._take("punct", ")")
            return tuple(path), names
        if len(path) < 2:
            raise _NotPlain
        return tuple(path[:-1]), path[-1:]

    def _expansions(self, top: bool = False) -> Node:
        alternatives = []
        while True:
            items = []
            while self._peek()[0] != "nl" and self._peek() not in _ENDS:
                items.append(self._expr())
            expansion = Node("expansion", items)
            if self._peek() == ("punct", "->"):
                self.at += 1
                alias = self._take("name")
                if not top or alias.isupper():
                    raise _NotPlain
                expansion = Node("alias", [expansion, alias])
            alternatives.append(expansion)
            if self._peek() != ("punct", "|"):
                return Node("expansions", alternatives)
            self.at += 1

    def _expr(self):
        kind, value = self._peek()
        self.at += 1
        if (kind, value) == ("punct", "("):
            atom = self._expansions()
            self._take("punct", ")")
        elif (kind, value) == ("punct", "["):
            atom = Node("maybe", [self._expansions()])
            self._take("punct", "]")
        elif kind == "name":
            atom = Filtered(value) if value.startswith("_") and value.isupper() else value
        elif kind == "string" and self._peek() == ("punct", ".."):
            self.at += 1
            atom = _Range(value, self._take("string"))
        elif kind in ("string", "regexp"):
            atom = _Literal(kind.upper(), value)
        else:
            raise _NotPlain
        kind, value = self._peek()
        if (kind, value) in (("punct", "?"), ("punct", "*"), ("punct", "+")):
            self.at += 1
            return Node("expr", [atom, value])
        if (kind, value) == ("punct", "~"):
            self.at += 1
            bounds = [int(self._take("number"))]
            if self._peek() == ("punct", ".."):
                self.at += 1
                bounds.append(int(self._take("number")))
            if len(bounds) == 2 and not 0 <= bounds[0] <= bounds[1]:
                raise _NotPlain
            return Node("expr", [atom, "~", *bounds])
        return atom


def _names(tree: Node):
    for c in tree.children:
        if isinstance(c, Node):
            yield from _names(c)
        elif isinstance(c, str) and c not in ("?", "*", "+", "~") and not (tree.data == "alias" and c is tree.children[1]):
            yield c


def _leaf_pattern(leaf) -> Pattern:
    if isinstance(leaf, _Literal):
        if "\n" in leaf.raw:
            raise _NotPlain
        return _literal_to_pattern(Token(leaf.kind, leaf.raw))
    first, last = leaf.first[1:-1], leaf.last[1:-1]  # Lark's `range`
    if leaf.first.endswith("i") or leaf.last.endswith("i") or len(eval_escaping(first)) != 1 or len(eval_escaping(last)) != 1:
        raise _NotPlain
    return PatternRE(f"[{first}-{last}]")


def _pattern(item, trees: dict[str, Node], done: dict[str, Pattern], active: set[str]) -> Pattern:
    """Lark's TerminalTreeToPattern of a terminal's tree, its terminal references inlined."""
    if isinstance(item, (_Literal, _Range)):
        return _leaf_pattern(item)
    if isinstance(item, str):  # a terminal named in a terminal
        if not item.isupper() or item in active:
            raise _NotPlain  # (a rule in a terminal; a recursive terminal)
        if item not in done:
            active.add(item)
            body = trees[item]
            if len(body.children) == 1 and not body.children[0].children:
                raise _NotPlain  # (an empty terminal)
            done[item] = _pattern(body, trees, done, active)
            active.discard(item)
        return done[item]
    if item.data == "alias":
        raise _NotPlain
    if item.data == "maybe":
        return _operator(_pattern(item.children[0], trees, done, active), "?")
    if item.data == "expr":
        return _operator(_pattern(item.children[0], trees, done, active), *item.children[1:])
    parts = [_pattern(c, trees, done, active) for c in item.children]
    if item.data == "expansion":
        if not parts:
            return PatternStr("")
        return parts[0] if len(parts) == 1 else PatternRE("".join(p.to_regexp() for p in parts))
    if len(parts) == 1:
        return parts[0]
    parts.sort(key=lambda p: (-p.max_width, -p.min_width, -len(p.value)))
    return PatternRE("(?:%s)" % "|".join(p.to_regexp() for p in parts))


def _operator(inner: Pattern, op: str, *bounds: int) -> Pattern:
    if op == "~":
        op = "{%d}" % bounds[0] if len(bounds) == 1 else "{%d,%d}" % tuple(bounds)
    return PatternRE(f"(?:{inner.to_regexp()}){op}", inner.flags)


class _AnonymousTerminals:
    """Lark's PrepareAnonTerminals: a literal in a rule is the terminal with its pattern, else a new
    one, named as Lark names it (LPAR, IF, __ANON_0)."""

    def __init__(self, patterns: dict[str, Pattern]) -> None:
        self.patterns = dict(patterns)
        self.by_pattern = {p: name for name, p in patterns.items()}
        self.i = 0

    def name(self, p: Pattern) -> str:
        name = self.by_pattern.get(p)
        if name is None:
            if isinstance(p, PatternStr):
                name = _TERMINAL_NAMES.get(p.value)
                if (
                    name is None
                    and p.value
                    and is_id_continue(p.value)
                    and is_id_start(p.value[0])
                    and p.value.upper() not in self.patterns
                ):
                    name = p.value.upper()
                if name in self.patterns:
                    name = None
            if name is None:
                name = "__ANON_%d" % self.i
                self.i += 1
            self.patterns[name] = p
            self.by_pattern[p] = name
        return Filtered(name) if isinstance(p, PatternStr) else name


def _resolve(tree: Node, named: _AnonymousTerminals) -> Node:
    """A rule's tree with its literals named as terminals, in Lark's order: its in-place
    transformer meets them as children of each subtree, children's subtrees first."""
    tree = tree.copy()
    for sub in subtrees(tree):
        sub.children = [named.name(_leaf_pattern(c)) if isinstance(c, (_Literal, _Range)) else c for c in sub.children]
    return tree


def _used_rules(rules: list[Rule]) -> list[Rule]:
    """Lark drops the rules nothing else (not themselves) uses, until none is left to drop."""
    while True:
        used = {s for r in rules for s in r.expansion if s != r.origin} | {"start"}
        kept = [r for r in rules if r.origin in used]
        if len(kept) == len(rules):
            return rules
        rules = kept
