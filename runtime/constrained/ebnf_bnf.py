"""EBNF rule bodies -> BNF rules, as Lark's grammar compiler makes them, without Lark's text round trip.

    Node("expansions", [Node("expansion", [...]), ...])   alternatives of sequences, as Lark parses them
    Node("expr", [item, "?" | "*" | "+" | "~", lo?, hi?])  an operator on an item
    Node("maybe", [expansions])                            `[...]`
    Node("alias", [expansion, name])                       `... -> name`, an alternative of a rule
    to_bnf({rule: Node("expansions", ...)}, keep_all, priorities) -> [lalr.Rule]

A GBNF grammar's recursive rules (ebnf_gbnf.py) were written out as Lark text for Lark to parse
and compile (~2.5 ms of a JSON grammar's ~8 ms compile). Here the translator's trees, shaped as
Lark's parser shapes that text, go through the same steps as Lark's `Grammar.compile`:
`EBNF_to_BNF` (`x?` -> `x | ()`, `x+` -> a left-recursive rule `__<rule>_plus_<i>`, `x*` -> that
rule or nothing, `x~m..n` -> the repetitions, split into sub-rules past 50 as Lark does, one rule
per distinct operand), then `SimplifyRule_Visitor` (nested sequences inlined, an alternative inside
a sequence distributed over it, duplicates dropped). The rules, and so the LALR tables and
their conflicts, are Lark's own (tested on random grammars against Lark's compile of the text).
Lark syntax read by lark_plain.py adds `[...]` (an option whose absence holds placeholders, so
that `[a] [a]` collides as in Lark) and aliases (which keep alternatives apart the same way).
"""

from __future__ import annotations

import math

from lark.utils import small_factors

from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.lalr import Rule

REPEAT_BREAK_THRESHOLD = 50  # Lark's: `x~m..n` with n past this is built of sub-rules
SMALL_FACTOR_THRESHOLD = 5  # Lark's factor bound for those sub-rules
EMPTY = "__empty__"  # Lark's placeholder for an absent `[...]` (never a rule's or terminal's name)
MAX_ALTERNATIVES = 20_000  # a rule whose optional parts distribute to more is refused (Lark had no bound:
# `(a? b? ... )` of 30 optionals is 2^30 alternatives, memory gone before the compile's timeout)


class Filtered(str):
    """A terminal Lark leaves out of its trees (a string literal, or a name starting with `_`): `[...]`
    keeps no placeholder for it. Equal to its name."""

    __slots__ = ()


class Node:
    """A tree node of Lark's grammar syntax: "expansions", "expansion" or "expr"; items are Nodes or
    symbol names. Equal by content, as Lark's trees (duplicates and repeated operands are found so);
    changed in place by the steps below, as Lark's are."""

    __slots__ = ("data", "children")

    def __init__(self, data: str, children: list) -> None:
        self.data = data
        self.children = children

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Node) and self.data == other.data and self.children == other.children

    def __hash__(self) -> int:
        return hash((self.data, tuple(self.children)))

    def __repr__(self) -> str:
        return f"Node({self.data!r}, {self.children!r})"

    def copy(self) -> Node:
        return Node(self.data, [c.copy() if isinstance(c, Node) else c for c in self.children])


def subtrees(tree: Node) -> list[Node]:
    """Lark's `Tree.iter_subtrees` order: each node once, children before parents (the order in which
    Lark transforms decides which of two repeated operands names the rule they share)."""
    queue, seen = [tree], {}
    for sub in queue:
        seen[id(sub)] = sub
        queue += [c for c in reversed(sub.children) if isinstance(c, Node) and id(c) not in seen]
    return list(seen.values())[::-1]


def group(*alternatives) -> Node:
    """`( a | b c | ... )`: each alternative an item or a list of items (a sequence)."""
    return Node("expansions", [Node("expansion", list(a) if isinstance(a, list) else [a]) for a in alternatives])


class _ToBnf:
    """Lark's EBNF_to_BNF: operators to alternatives and new rules (`new_rules`), one per distinct operand."""

    def __init__(self) -> None:
        self.new_rules: list[tuple[str, Node]] = []
        self.cache: dict[object, str] = {}
        self.prefix = ""
        self.keep_all = False  # the rule's `!`: its `[...]` keeps placeholders for every terminal
        self.i = 0

    def transform(self, tree: Node) -> Node:
        """Lark's Transformer_InPlace: each subtree's operator children replaced, children first."""
        for sub in subtrees(tree):
            sub.children = [self._operator(c) if isinstance(c, Node) and c.data in ("expr", "maybe") else c for c in sub.children]
        return tree

    def _operator(self, node: Node):
        if node.data == "maybe":  # Lark's `maybe`: the absent option holds one placeholder per kept symbol
            inner = node.children[0]
            return Node("expansions", [inner, Node("expansion", [EMPTY] * self._size(inner))])
        return self._expr(*node.children)

    def _size(self, item) -> int:
        """Lark's FindRuleSize: the symbols of `item` its tree would keep (max over alternatives)."""
        if isinstance(item, Node):
            sizes = [self._size(c) for c in item.children]
            return sum(sizes) if item.data == "expansion" else max(sizes)
        if item == EMPTY:
            return 0
        if item.isupper():
            return int(self.keep_all or not isinstance(item, Filtered))
        return int(not item.startswith("_"))

    def _expr(self, operand, op: str, *bounds: int):
        if op == "?":
            return Node("expansions", [operand, Node("expansion", [])])
        if op == "+":
            return self._recurse("plus", operand)
        if op == "*":
            return Node("expansions", [self._recurse("star", operand), Node("expansion", [])])
        lo, hi = (bounds[0], bounds[0]) if len(bounds) == 1 else bounds
        return self._repeats(operand, lo, hi)

    def _rule(self, key: object, kind: str, alternatives) -> str:
        """The rule kept for `key`, else a new one named `__<rule>_<kind>_<i>`, its body
        `alternatives(name)` (lists of items)."""
        name = self.cache.get(key)
        if name is None:
            name = self.cache[key] = f"__{self.prefix}_{kind}_{self.i}"
            self.i += 1
            self.new_rules.append((name, Node("expansions", [Node("expansion", a) for a in alternatives(name)])))
        return name

    def _recurse(self, kind: str, operand) -> str:
        return self._rule(operand, kind, lambda name: [[operand], [name, operand]])

    def _repeat_rule(self, a: int, b: int, target, atom) -> str:
        return self._rule((a, b, target, atom), f"repeat_a{a}_b{b}", lambda _: [[target] * a + [atom] * b])

    def _repeat_opt_rule(self, a: int, b: int, target, target_opt, atom) -> str:
        return self._rule(
            (a, b, target, atom, "opt"),
            f"repeat_a{a}_b{b}_opt",
            lambda _: [[target] * i + [target_opt] for i in range(a)] + [[target] * a + [atom] * i for i in range(b)],
        )

    def _repeats(self, operand, lo: int, hi: int):
        if hi < REPEAT_BREAK_THRESHOLD:
            return Node("expansions", [Node("expansion", [operand] * n) for n in range(lo, hi + 1)])
        lo_target = operand  # `x~lo` of sub-rules, then `x~0..(hi - lo)` (Lark's _generate_repeats)
        for a, b in small_factors(lo, SMALL_FACTOR_THRESHOLD):
            lo_target = self._repeat_rule(a, b, lo_target, operand)
        if hi == lo:
            return lo_target
        factors = small_factors(hi - lo + 1, SMALL_FACTOR_THRESHOLD)
        target, target_opt = operand, Node("expansion", [])
        for a, b in factors[:-1]:
            target_opt = self._repeat_opt_rule(a, b, target, target_opt, operand)
            target = self._repeat_rule(a, b, target, operand)
        a, b = factors[-1]
        target_opt = self._repeat_opt_rule(a, b, target, target_opt, operand)
        return Node("expansions", [Node("expansion", [lo_target, target_opt])])


def _flatten(tree: Node) -> None:
    """Inline the children of tree's own kind, until none is left (Lark's `expand_kids_by_data`)."""
    changed = True
    while changed:
        changed = False
        for i in range(len(tree.children) - 1, -1, -1):
            child = tree.children[i]
            if isinstance(child, Node) and child.data == tree.data:
                tree.children[i : i + 1] = child.children
                changed = True


def _simplify(tree: Node, made: list[int]) -> Node:
    """Lark's SimplifyRule_Visitor: nested sequences and alternatives inlined, an alternative within a
    sequence distributed over it (its options deduplicated), duplicate alternatives dropped. made[0]
    counts the sequences distribution makes; past MAX_ALTERNATIVES, or a sequence whose groups
    multiply past it (refused before distributing: one level of recursion per group), GrammarError."""
    for sub in subtrees(tree):
        _flatten(sub)
        if sub.data == "expansions":
            if len(set(sub.children)) != len(sub.children):
                sub.children = list(dict.fromkeys(sub.children))
        elif sub.data == "alias":  # Lark's: an alias over alternatives names each of them
            inner, name = sub.children
            if inner.data == "expansions":
                sub.data, sub.children = "expansions", [Node("alias", [c, name]) for c in inner.children]
        elif sub.data == "expansion":
            counts = [len(set(c.children)) for c in sub.children if isinstance(c, Node) and c.data == "expansions"]
            for i, child in enumerate(sub.children):
                if isinstance(child, Node) and child.data == "expansions":
                    options = dict.fromkeys(child.children)
                    made[0] += len(options)
                    if made[0] > MAX_ALTERNATIVES or math.prod(counts) > MAX_ALTERNATIVES:
                        raise GrammarError(
                            f"its optional and alternative parts expand to more than {MAX_ALTERNATIVES:,} sequences", ErrorKind.TOO_LARGE
                        )
                    sub.data = "expansions"
                    sub.children = [
                        _simplify(Node("expansion", [o if i == j else c for j, c in enumerate(sub.children)]), made) for o in options
                    ]
                    _flatten(sub)
                    break
    return tree


def rule_tree(item) -> Node:
    """The tree Lark parses `name: <item>` to."""
    return Node("expansions", [Node("expansion", [item])])


def to_bnf(trees: dict[str, Node], keep_all: frozenset[str] = frozenset(), priorities: dict[str, int] | None = None) -> list[Rule]:
    """{rule name: its `expansions` tree} -> the BNF rules Lark compiles them to (the trees are not
    changed). `keep_all`: the rules marked `!`; `priorities`: the rules' `.n` (their own
    alternatives take it, not the rules made of their operators). Lark's errors: an alias on a
    `_rule`, and the same alternative twice (`[a] [a]`, or aliases apart)."""
    converter = _ToBnf()
    named: list[tuple[str, Node]] = []
    for name, tree in trees.items():
        converter.prefix, converter.keep_all = name, name in keep_all
        named.append((name, converter.transform(tree.copy())))
    named += converter.new_rules
    rules: dict[Rule, None] = {}
    for name, tree in named:
        try:
            simple = _simplify(tree, [0])
        except GrammarError as e:
            raise GrammarError(f"rule {name!r}: {e}; split it into rules", e.kind) from None
        priority = (priorities or {}).get(name, 0)
        for alternative in simple.children:
            if alternative.data == "alias":
                alternative, alias = alternative.children
                if name.startswith("_"):
                    raise GrammarError(
                        f"Rule {name} is marked for expansion (it starts with an underscore) and isn't allowed to have aliases (alias={alias})"
                    )
            assert alternative.data == "expansion" and all(isinstance(s, str) for s in alternative.children), alternative
            rule = Rule(name, tuple(s for s in alternative.children if s != EMPTY), priority)
            if rule in rules and rule.expansion:  # (Lark's message)
                raise GrammarError(
                    f"Rules defined twice: \n  * <{name} : {' '.join(rule.expansion)}>\n\n(Might happen due to colliding expansion of optionals: [] or ?)"
                )
            rules[rule] = None
    return list(rules)


def to_lark(item) -> str:
    """An item in Lark's grammar syntax (what Lark parses back to the same tree)."""
    if isinstance(item, str):
        return item
    if item.data == "expansions":
        return "(" + " | ".join(to_lark(c) for c in item.children) + ")"
    if item.data == "expansion":
        return " ".join(to_lark(c) for c in item.children)
    operand, op, *bounds = item.children
    if op == "~":
        return f"{to_lark(operand)} ~ {'..'.join(map(str, bounds))}"
    return to_lark(operand) + op
