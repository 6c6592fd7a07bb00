"""GBNF (the EBNF dialect of llama.cpp, XGrammar and SGLang) -> BNF rules over regex terminals for an LALR parser.

    gbnf_rules(text) -> GbnfRules(bodies, terminals, start, rule_names)  .rules()  .lark_source()

GBNF has no lexer: every literal and character class matches characters. An LALR parser needs
terminals, so the translation makes one: a rule that reaches no recursion is a regular language
and is inlined as a regex; every maximal run of such regular pieces inside a recursive rule
becomes one terminal. A regular piece that may match nothing (`ws ::= [ \\t]*`) becomes an
optional terminal for its non-empty strings (terminals never match the empty string).
Terminals may overlap and follow each other without separators; the runtime lexes every way the
text splits, so the language is GBNF's own, character for character.

The recursive rules' bodies are trees of Lark's grammar syntax, turned into BNF rules as Lark's
compiler turns them (ebnf_bnf.py) without a Lark text to parse; `lark_source()` writes that text.
The GBNF text itself is read by `read_gbnf` (a recursive descent giving the tree Lark's LALR
parser of `_GBNF_GRAMMAR` gives); a text it refuses goes to that parser, whose errors name the line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import lark

from loom.runtime.constrained.ebnf_bnf import Node, group, rule_tree, to_bnf, to_lark
from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.lalr import Rule

MAX_REPEAT = 1000  # {m,n} bounds above this are refused: the automaton would be too large

_GBNF_GRAMMAR = r"""
start: rule+
rule: RULE_START alternatives
alternatives: sequence ("|" sequence)*
sequence: item*
item: atom QUANT?
?atom: STRING -> literal
     | CHARCLASS -> charclass
     | NAME -> ref
     | "." -> any
     | "(" alternatives ")"

RULE_START.2: /[A-Za-z_][A-Za-z0-9_.-]*[ \t]*::=/
NAME: /[A-Za-z_][A-Za-z0-9_.-]*/
STRING: /"(?:[^"\\\n]|\\.)*"/
CHARCLASS: /\[(?:[^\]\\\n]|\\.)*\]/
QUANT: /[*+?]/ | /\{[ \t]*[0-9]*[ \t]*(,[ \t]*[0-9]*[ \t]*)?\}/
COMMENT: /#[^\n]*/
%ignore /\s+/
%ignore COMMENT
"""
LARK_PARSER = lark.Lark(_GBNF_GRAMMAR, parser="lalr")  # (errors name lines from tokens, not tree positions)
_NAMES = {
    "RULE_START": "a rule `name ::=`", "NAME": "a rule name", "STRING": 'a "literal"', "CHARCLASS": "a [character class]",
    "QUANT": "a quantifier (* + ? {m,n})", "LPAR": "(", "RPAR": ")", "VBAR": "|", "DOT": ".", "$END": "the end of the grammar",
}  # fmt: skip


# ----------------------------------------------------------------------------- the tree


@dataclass(frozen=True, slots=True)
class Chars:
    ranges: tuple[tuple[int, int], ...]  # code points, inclusive
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Lit:
    text: str


@dataclass(frozen=True, slots=True)
class Ref:
    name: str
    line: int


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    options: tuple[Expr, ...]


@dataclass(frozen=True, slots=True)
class Rep:
    item: Expr
    lo: int
    hi: int | None  # None: unbounded


Expr = Chars | Lit | Ref | Seq | Alt | Rep

_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "'": "'", "[": "[", "]": "]", "-": "-", "^": "^", "/": "/", "0": "\0", "f": "\f", "v": "\v", "a": "\a", "b": "\b", ".": "."}  # fmt: skip
_HEX = {"x": 2, "u": 4, "U": 8}


def _unescape(body: str, where: str) -> list[tuple[str, bool]]:
    """Literal / class body -> [(char, was_escaped)]; \\xHH, \\uHHHH, \\UHHHHHHHH are code points."""
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append((ch, False))
            i += 1
            continue
        if i + 1 >= len(body):
            raise GrammarError(f"{where}: a lone backslash at the end; expected an escape such as \\n or \\x41")
        e = body[i + 1]
        if e in _HEX:
            digits = body[i + 2 : i + 2 + _HEX[e]]
            if len(digits) != _HEX[e] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise GrammarError(f"{where}: \\{e} must be followed by {_HEX[e]} hex digits, got {body[i : i + 2 + _HEX[e]]!r}")
            cp = int(digits, 16)
            if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
                raise GrammarError(f"{where}: \\{e}{digits} is not a Unicode scalar value")
            out.append((chr(cp), True))
            i += 2 + _HEX[e]
        elif e in _ESCAPES:
            out.append((_ESCAPES[e], True))
            i += 2
        else:
            raise GrammarError(f"{where}: unknown escape \\{e}; expected one of \\n \\r \\t \\\\ \\\" \\[ \\] \\xHH \\uHHHH")
    return out


def _charclass(token: lark.Token, rule: str) -> Chars:
    where = f"rule {rule!r} line {token.line}: character class {token.value}"
    chars = _unescape(token.value[1:-1], where)
    negated = bool(chars) and chars[0] == ("^", False)
    chars = chars[negated:]
    if not chars:
        raise GrammarError(f"{where} is empty; expected at least one character or range")
    ranges: list[tuple[int, int]] = []
    i = 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == ("-", False):
            lo, hi = ord(chars[i][0]), ord(chars[i + 2][0])
            if lo > hi:
                raise GrammarError(f"{where}: range {chars[i][0]!r}-{chars[i + 2][0]!r} is backwards; expected low-high")
            ranges.append((lo, hi))
            i += 3
        else:
            ranges.append((ord(chars[i][0]), ord(chars[i][0])))
            i += 1
    return Chars(tuple(ranges), negated)


def _quantify(item: Expr, quant: lark.Token, rule: str) -> Expr:
    q = quant.value.replace(" ", "").replace("\t", "")
    if q in ("*", "+", "?"):
        return Rep(item, 1 if q == "+" else 0, 1 if q == "?" else None)
    lo_s, comma, hi_s = q[1:-1].partition(",")
    where = f"rule {rule!r} line {quant.line}: repetition {quant.value}"
    if not lo_s and not comma:
        raise GrammarError(f"{where} is empty; expected {{m}}, {{m,}}, {{m,n}} or {{,n}}")
    lo = int(lo_s) if lo_s else 0
    hi = lo if not comma else int(hi_s) if hi_s else None
    if hi is not None and hi < lo:
        raise GrammarError(f"{where}: the upper bound is below the lower; expected m <= n")
    if max(lo, hi or 0) > MAX_REPEAT:
        raise GrammarError(f"{where}: bounds above {MAX_REPEAT} are not supported")
    return Rep(item, lo, hi)


def _expr(tree: lark.Tree | lark.Token, rule: str) -> Expr:
    if isinstance(tree, lark.Token):
        raise AssertionError(f"unexpected token {tree!r}")
    kind = tree.data
    if kind == "alternatives":
        opts = tuple(_expr(c, rule) for c in tree.children)
        return opts[0] if len(opts) == 1 else Alt(opts)
    if kind == "sequence":
        items = tuple(_expr(c, rule) for c in tree.children)
        return items[0] if len(items) == 1 else Seq(items)
    if kind == "item":
        inner = _expr(tree.children[0], rule)
        return _quantify(inner, tree.children[1], rule) if len(tree.children) > 1 else inner
    if kind == "literal":
        tok = tree.children[0]
        chars = _unescape(tok.value[1:-1], f"rule {rule!r} line {tok.line}: literal {tok.value}")
        return Lit("".join(c for c, _ in chars))
    if kind == "charclass":
        return _charclass(tree.children[0], rule)
    if kind == "ref":
        tok = tree.children[0]
        return Ref(tok.value, tok.line)
    if kind == "any":
        return Chars(((0, 0x10FFFF),))
    raise AssertionError(f"unexpected node {kind}")


_TOKEN = re.compile(
    r"""(?P<skip>\s+|\#[^\n]*)
    |(?P<RULE_START>[A-Za-z_][A-Za-z0-9_.-]*[ \t]*::=)
    |(?P<NAME>[A-Za-z_][A-Za-z0-9_.-]*)
    |(?P<STRING>"(?:[^"\\\n]|\\.)*")
    |(?P<CHARCLASS>\[(?:[^\]\\\n]|\\.)*\])
    |(?P<QUANT>[*+?]|\{[ \t]*[0-9]*[ \t]*(?:,[ \t]*[0-9]*[ \t]*)?\})
    |(?P<punct>[().|])""",
    re.X,
)
_ATOMS = {"STRING": "literal", "CHARCLASS": "charclass", "NAME": "ref"}


class _NotRead(Exception):
    """The fast reader stops: Lark's parser reads the text (and names what is wrong)."""


def read_gbnf(text: str) -> lark.Tree | None:
    """The tree `LARK_PARSER.parse(text)` gives (the same nodes, token types and lines), read by a
    recursive descent over one regex's tokens: ~0.2 ms where Lark's parser took ~1 ms of a JSON
    grammar's compile. None where the text is not well formed: Lark's parser then says why."""
    tokens: list[tuple[str, str, int]] = []  # (type, text, line)
    line, at = 1, 0
    while at < len(text):
        m = _TOKEN.match(text, at)
        if m is None:
            return None
        if m.lastgroup != "skip":
            tokens.append((m.lastgroup, m.group(), line))
        line += m.group().count("\n")
        at = m.end()
    reader = _GbnfReader(tokens)
    try:
        rules = []
        while reader.at < len(tokens) or not rules:
            kind, value, line = reader.take("RULE_START")
            rules.append(lark.Tree("rule", [lark.Token("RULE_START", value, line=line), reader.alternatives(False)]))
    except _NotRead:
        return None
    return lark.Tree("start", rules)


class _GbnfReader:
    def __init__(self, tokens: list[tuple[str, str, int]]) -> None:
        self.tokens = tokens
        self.at = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.at] if self.at < len(self.tokens) else None

    def take(self, kind: str, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None or tok[0] != kind or (value is not None and tok[1] != value):
            raise _NotRead
        self.at += 1
        return tok

    def alternatives(self, nested: bool) -> lark.Tree:
        sequences = [self.sequence(nested)]
        while (tok := self.peek()) is not None and tok[1] == "|":
            self.at += 1
            sequences.append(self.sequence(nested))
        return lark.Tree("alternatives", sequences)

    def sequence(self, nested: bool) -> lark.Tree:
        items = []
        while (tok := self.peek()) is not None and tok[1] not in ("|", ")") and tok[0] != "RULE_START":
            kind, value, line = tok
            self.at += 1
            if kind in _ATOMS:
                atom = lark.Tree(_ATOMS[kind], [lark.Token(kind, value, line=line)])
            elif value == ".":
                atom = lark.Tree("any", [])
            elif value == "(":
                atom = self.alternatives(True)
                self.take("punct", ")")
            else:
                raise _NotRead
            quant = self.peek()
            if quant is not None and quant[0] == "QUANT":
                self.at += 1
                items.append(lark.Tree("item", [atom, lark.Token("QUANT", quant[1], line=quant[2])]))
            else:
                items.append(lark.Tree("item", [atom]))
        tok = self.peek()
        if tok is not None and ((tok[0] == "RULE_START" and nested) or (tok[1] == ")" and not nested)):
            raise _NotRead  # (a rule inside parentheses; an unopened parenthesis)
        return lark.Tree("sequence", items)


def parse_gbnf(text: str) -> dict[str, Expr]:
    """GBNF text -> {rule name: expression}, in order. Raises GrammarError naming the line."""
    try:
        tree = read_gbnf(text) or LARK_PARSER.parse(text)
    except lark.UnexpectedInput as e:
        if isinstance(e, lark.UnexpectedToken):
            got = "the end of the grammar" if e.token.type == "$END" else repr(e.token.value)
            expected = sorted({_NAMES.get(t, t) for t in e.expected})
            msg = f"got {got}; expected {' or '.join(expected)}"
        else:
            msg = f"unexpected character {text[e.pos_in_stream] if e.pos_in_stream is not None else ''!r}"  # type: ignore[attr-defined]
        context = e.get_context(text).rstrip()
        raise GrammarError(f"ebnf grammar: line {e.line} column {e.column}: {msg}\n{context}") from None
    rules: dict[str, Expr] = {}
    for node in tree.children:
        head, body = node.children
        name = head.value[:-3].strip()
        if name in rules:
            raise GrammarError(f"ebnf grammar: line {head.line}: rule {name!r} is defined twice")
        rules[name] = _expr(body, name)
    return rules


# ----------------------------------------------------------------------------- translation


def _refs(e: Expr) -> list[Ref]:
    if isinstance(e, Ref):
        return [e]
    if isinstance(e, Seq | Alt):
        return [r for x in (e.items if isinstance(e, Seq) else e.options) for r in _refs(x)]
    if isinstance(e, Rep):
        return _refs(e.item)
    return []


def _cp(c: int) -> str:
    """A code point in a terminal's regex (read as it is, or within `/.../` of `lark_source()`, where
    Lark evaluates \\x / \\u escapes itself): ASCII punctuation, which may be special to the regex
    (or end the `/.../`), is backslash-escaped."""
    ch = chr(c)
    if ch.isalnum() and c < 0x80:
        return ch
    if 0x21 <= c <= 0x7E:
        return "\\" + ch
    return f"\\x{c:02x}" if c <= 0xFF else f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}"


def _class_regex(e: Chars) -> str:
    body = "".join(_cp(lo) if lo == hi else f"{_cp(lo)}-{_cp(hi)}" for lo, hi in e.ranges)
    return f"[{'^' if e.negated else ''}{body}]"


@dataclass(frozen=True, slots=True)
class GbnfRules:
    """A GBNF grammar as rules over terminals: the recursive rules' bodies in Lark's grammar syntax
    (ebnf_bnf.Node items), the terminals' regexes (each matching at least one character)."""

    bodies: dict[str, str | Node]  # rule name -> body
    terminals: list[tuple[str, str]]  # (name, regex)
    start: str  # the start rule
    rule_names: dict[str, str]  # rule name here -> GBNF rule name, for messages

    def rules(self) -> list[Rule]:
        """The BNF rules, as Lark compiles `lark_source()` (ebnf_bnf.to_bnf)."""
        return to_bnf({name: rule_tree(body) for name, body in self.bodies.items()})

    def lark_source(self) -> str:
        """The grammar as a Lark grammar (`start` its start rule)."""
        lines = [f"{name}: {to_lark(body)}" for name, body in self.bodies.items()]
        lines += [f"{term}: /{pattern}/" for term, pattern in self.terminals]  # (`/` is escaped by _cp)
        return "\n".join(lines) + "\n"


class _Translator:
    def __init__(self, rules: dict[str, Expr]) -> None:
        self.rules = rules
        self.regular = self._regular_rules()
        self.lark_name = self._rule_names()
        self.terminals: dict[str, str] = {}  # regex -> terminal name
        self.regex_cache: dict[str, str] = {}

    def _regular_rules(self) -> set[str]:
        """Rules from which no recursion is reachable: regular languages, inlined as regexes. (A rule
        is regular once every rule it uses is: resolved outward from the rules that use none,
        without recursion, so a chain of thousands of rules is no deeper a call stack.)"""
        uses = {name: {r.name for r in _refs(body)} for name, body in self.rules.items()}
        users: dict[str, list[str]] = {name: [] for name in self.rules}
        for name, used in uses.items():
            for u in used:
                users[u].append(name)
        waiting = {name: len(used) for name, used in uses.items()}
        ready = [name for name, n in waiting.items() if n == 0]
        regular: set[str] = set()
        while ready:
            name = ready.pop()
            regular.add(name)
            for user in users[name]:
                waiting[user] -= 1
                if waiting[user] == 0:
                    ready.append(user)
        return regular

    def _rule_names(self) -> dict[str, str]:
        out: dict[str, str] = {}
        taken: set[str] = set()
        for name in self.rules:
            base = "r_" + re.sub(r"[^a-z0-9_]", "_", name.lower())
            cand, k = base, 1
            while cand in taken:
                cand, k = f"{base}_{k}", k + 1
            taken.add(cand)
            out[name] = cand
        return out

    # ---- regular pieces -> regexes
    def is_regular(self, e: Expr) -> bool:
        return all(r.name in self.regular for r in _refs(e))

    def regex(self, e: Expr) -> str:
        if isinstance(e, Lit):
            return "".join(_cp(ord(c)) for c in e.text)
        if isinstance(e, Chars):
            return _class_regex(e)
        if isinstance(e, Ref):
            if e.name not in self.regex_cache:
                self.regex_cache[e.name] = self.regex(self.rules[e.name])
            return f"(?:{self.regex_cache[e.name]})"
        if isinstance(e, Seq):
            return "".join(self.regex(x) for x in e.items)
        if isinstance(e, Alt):
            return "(?:" + "|".join(self.regex(x) for x in e.options) + ")"
        q = {(0, None): "*", (1, None): "+", (0, 1): "?"}.get((e.lo, e.hi))
        if q is None:
            q = f"{{{e.lo},}}" if e.hi is None else f"{{{e.lo}}}" if e.lo == e.hi else f"{{{e.lo},{e.hi}}}"
        return f"(?:{self.regex(e.item)}){q}"

    def nullable(self, e: Expr) -> bool:
        if isinstance(e, Lit):
            return not e.text
        if isinstance(e, Chars):
            return False
        if isinstance(e, Ref):
            return self.nullable(self.rules[e.name])
        if isinstance(e, Seq):
            return all(self.nullable(x) for x in e.items)
        if isinstance(e, Alt):
            return any(self.nullable(x) for x in e.options)
        return e.lo == 0 or self.nullable(e.item)

    def nonempty(self, e: Expr) -> Expr | None:
        """An expression for e's non-empty strings (None: e matches only the empty string)."""
        if not self.nullable(e):
            return e
        if isinstance(e, Lit):
            return None
        if isinstance(e, Ref):
            return self.nonempty(self.rules[e.name])
        if isinstance(e, Alt):
            opts = tuple(x for x in (self.nonempty(o) for o in e.options) if x is not None)
            return Alt(opts) if opts else None
        if isinstance(e, Seq):  # e = x rest, all nullable: x' rest | rest'
            head, rest = e.items[0], Seq(e.items[1:])
            h = self.nonempty(head)
            r = self.nonempty(rest) if len(e.items) > 1 else None
            opts = tuple(x for x in (Seq((h, rest)) if h is not None else None, r) if x is not None)
            return None if not opts else opts[0] if len(opts) == 1 else Alt(opts)
        assert isinstance(e, Rep)
        inner = self.nonempty(e.item)
        if inner is None or e.hi == 0:
            return None
        return Seq((inner, Rep(e.item, 0, None if e.hi is None else e.hi - 1)))

    def terminal(self, e: Expr) -> str | Node | None:
        """An item for a regular piece: a terminal, optional when the piece may be empty (None: it
        matches only the empty string)."""
        body = self.nonempty(e)
        if body is None:
            return None
        pattern = self.regex(body)
        name = self.terminals.get(pattern)
        if name is None:
            name = self.terminals[pattern] = f"T{len(self.terminals)}"
        return Node("expr", [name, "?"]) if self.nullable(e) else name

    # ---- recursive rules -> items of Lark's grammar syntax (ebnf_bnf.Node)
    def expansion(self, e: Expr) -> str | Node:
        if self.is_regular(e):
            item = self.terminal(e)
            return group([]) if item is None else item
        if isinstance(e, Ref):
            return self.lark_name[e.name]
        if isinstance(e, Alt):
            return group(*(self.expansion(x) for x in e.options))
        if isinstance(e, Seq):
            parts: list[str | Node] = []
            run: list[Expr] = []
            for x in e.items + (None,):  # type: ignore[operator]
                if x is not None and self.is_regular(x):
                    run.append(x)
                    continue
                if run:
                    item = self.terminal(run[0] if len(run) == 1 else Seq(tuple(run)))
                    parts += [item] if item is not None else []
                    run = []
                if x is not None:
                    parts.append(self.expansion(x))
            return group(parts)
        assert isinstance(e, Rep)
        inner = self.expansion(e.item)
        if isinstance(inner, Node) and inner.data == "expr":  # (an operator's operand is an atom: `(x?)*`)
            inner = group(inner)
        if e.hi == 0:  # x{0}: nothing
            return group([])
        if (e.lo, e.hi) in ((0, None), (1, None), (0, 1)):
            return Node("expr", [inner, {(0, None): "*", (1, None): "+", (0, 1): "?"}[(e.lo, e.hi)]])
        if e.hi is None:
            again = inner.copy() if isinstance(inner, Node) else inner  # (Lark parses the text's two copies apart)
            return group([Node("expr", [inner, "~", e.lo]), Node("expr", [again, "*"])])
        if e.lo:
            return group(Node("expr", [inner, "~", e.lo, e.hi]))
        return Node("expr", [group(Node("expr", [inner, "~", 1, e.hi])), "?"])

    def translate(self, start: str) -> GbnfRules:
        bodies: dict[str, str | Node] = {}
        if start in self.regular:
            bodies[self.lark_name[start]] = self.expansion(self.rules[start])
        # the recursive rules (regular ones are inlined where they are used)
        reachable = self._reachable(start)
        for name in self.rules:
            if name not in self.regular and name in reachable:
                bodies[self.lark_name[name]] = self.expansion(self.rules[name])
        terminals = [(term, pattern) for pattern, term in self.terminals.items()]
        return GbnfRules(bodies, terminals, self.lark_name[start], {v: k for k, v in self.lark_name.items()})

    def _reachable(self, start: str) -> set[str]:
        """The rules `start` uses, itself included."""
        seen, todo = {start}, [start]
        while todo:
            for r in _refs(self.rules[todo.pop()]):
                if r.name not in seen:
                    seen.add(r.name)
                    todo.append(r.name)
        return seen


def gbnf_rules(text: str, start: str = "root") -> GbnfRules:
    """GBNF text -> its rules over terminals (and as a Lark grammar). Raises GrammarError for syntax
    errors, undefined rules, a missing start rule and bad escapes, ranges or repetition bounds."""
    rules = parse_gbnf(text)
    if start not in rules:
        raise GrammarError(f"ebnf grammar has no {start!r} rule; expected `{start} ::= ...` (generation starts there)")
    for name, body in rules.items():
        for ref in _refs(body):
            if ref.name not in rules:
                raise GrammarError(f"ebnf grammar: line {ref.line}: rule {name!r} uses {ref.name!r}, which is not defined")
    return _Translator(rules).translate(start)
