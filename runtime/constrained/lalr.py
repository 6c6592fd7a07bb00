"""LALR(1) parse tables for the EBNF engine, from BNF rules.

    lalr_table(rules, start) -> LalrTable(actions, start_state, end_state)

The tables Lark's `LALR_Analyzer` makes of the same rules: LR(0) states, then DeRemer and
Pennello's look-aheads (reads, includes and lookback relations, solved by `lalr_digraph.digraph`),
the same quirk included (includes are walked from every item of the nonterminal's rules in the
state, not only those at their start), and the same conflict resolution: shift over reduce, a
reduce/reduce collision decided by rule priority or refused. One difference: Lark lets the Follow
pass grow the Read sets it shares between transitions, so in rare grammars its look-aheads are more
than LALR(1)'s, by an order that varies from run to run; here they are not. Only the representation differs: an
item is an int (a rule's first item plus the dot), a state a number in the order a breadth-first
walk from the start meets it, and a nonterminal's closure is found once. For a JSON grammar
(~20 rules, ~30 states) ~0.3 ms, where Lark's analysis took ~1.4.

A symbol is a nonterminal where some rule has it as origin, else a terminal; the end of input is
the terminal `$END`. As in Lark, the start rule is wrapped as `$root_<start>: <start>`, whose
look-ahead is `$END`, and the end state is the one after `<start>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.lalr_digraph import digraph

END = "$END"


class Rule(NamedTuple):
    origin: str
    expansion: tuple[str, ...]
    priority: int = 0  # a reduce/reduce collision goes to the strictly highest


class LalrTable(NamedTuple):
    # state -> symbol -> (True, next state): shift (a terminal) or goto (a nonterminal);
    # (False, (origin, expansion length)): reduce
    actions: list[dict[str, tuple[bool, object]]]
    start_state: int
    end_state: int


def _nullable(rules: Sequence[Rule]) -> set[str]:
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for r in rules:
            if r.origin not in found and all(s in found for s in r.expansion):
                found.add(r.origin)
                changed = True
    return found


def lalr_table(rules: Sequence[Rule], start: str) -> LalrTable:
    """The LALR(1) table of `rules` from `start`. Raises GrammarError on a reduce/reduce collision."""
    rules = [Rule(f"$root_{start}", (start,)), *rules]
    by_origin: dict[str, list[int]] = {}
    for k, r in enumerate(rules):
        by_origin.setdefault(r.origin, []).append(k)
    if start not in by_origin:
        raise GrammarError(f"Using an undefined rule: NonTerminal('{start}')")
    nullable = _nullable(rules)

    # items: rule k's item at dot d is first[k] + d
    first: list[int] = []
    item_rule: list[int] = []
    item_next: list[str | None] = []  # the symbol after the dot (None: the rule is complete)
    for k, r in enumerate(rules):
        first.append(len(item_rule))
        item_rule += [k] * (len(r.expansion) + 1)
        item_next += [*r.expansion, None]

    # a nonterminal's closure items: its rules' first items, and those of every nonterminal they start with
    starts: dict[str, tuple[int, ...]] = {}
    for name in by_origin:
        seen, todo, items = {name}, [name], []
        while todo:
            for k in by_origin[todo.pop()]:
                items.append(first[k])
                head = rules[k].expansion[0] if rules[k].expansion else None
                if head in by_origin and head not in seen:
                    seen.add(head)
                    todo.append(head)
        starts[name] = tuple(items)

    # LR(0) states, numbered breadth first
    kernels: dict[frozenset[int], int] = {frozenset({first[0]}): 0}
    kernel_list: list[frozenset[int]] = [frozenset({first[0]})]
    closures: list[list[int]] = []
    trans: list[dict[str, int]] = []
    s = 0
    while s < len(kernel_list):
        items = set(kernel_list[s])
        for it in kernel_list[s]:
            sym = item_next[it]
            if sym in starts:
                items.update(starts[sym])
        closure = sorted(items)
        closures.append(closure)
        moves: dict[str, list[int]] = {}
        for it in closure:
            sym = item_next[it]
            if sym is not None:
                moves.setdefault(sym, []).append(it + 1)
        out: dict[str, int] = {}
        for sym, advanced in moves.items():
            kernel = frozenset(advanced)
            t = kernels.get(kernel)
            if t is None:
                t = kernels[kernel] = len(kernel_list)
                kernel_list.append(kernel)
            out[sym] = t
        trans.append(out)
        s += 1

    # look-aheads (DeRemer and Pennello, as Lark's compute_reads_relations / includes_lookback / lookaheads)
    transitions: list[tuple[int, str]] = [(q, a) for q in range(len(trans)) for a in trans[q] if a in by_origin]
    directly_reads: dict[tuple[int, str], set[str]] = {}
    reads: dict[tuple[int, str], set[tuple[int, str]]] = {}
    for q, a in transitions:
        r = trans[q][a]
        directly_reads[(q, a)] = {sym for sym in trans[r] if sym not in by_origin}
        reads[(q, a)] = {(r, c) for c in trans[r] if c in nullable and c in by_origin}
    directly_reads[(0, start)].add(END)
    includes: dict[tuple[int, str], set[tuple[int, str]]] = {nt: set() for nt in transitions}
    lookback: dict[tuple[int, str], set[tuple[int, int]]] = {nt: set() for nt in transitions}
    for q, a in transitions:
        for it in closures[q]:
            k = item_rule[it]
            if rules[k].origin != a:
                continue
            expansion = rules[k].expansion
            dot = it - first[k]
            q2 = q
            for i in range(dot, len(expansion)):
                sym = expansion[i]
                nt2 = (q2, sym)
                q2 = trans[q2][sym]
                if nt2 in reads and all(x in nullable for x in expansion[i + 1 :]):
                    includes[nt2].add((q, a))
            if dot == 0:
                lookback[(q, a)].add((q2, k))
    read_sets = digraph(transitions, reads, directly_reads)
    # (copies: Lark hands the Read sets themselves to the second pass, where transitions sharing one
    # set, a reads cycle's, then leak Follow into each other in its visiting order, which is its sets'
    # order, so its tables vary from run to run; these are the exact look-aheads, never more than Lark's)
    follow = digraph(transitions, includes, {nt: set(found) for nt, found in read_sets.items()})
    lookaheads: list[dict[str, set[int]]] = [{} for _ in trans]
    for nt, backs in lookback.items():
        for q, k in backs:
            for sym in follow[nt]:
                lookaheads[q].setdefault(sym, set()).add(k)

    actions: list[dict[str, tuple[bool, object]]] = []
    collisions: list[str] = []
    for q, out in enumerate(trans):
        act: dict[str, tuple[bool, object]] = {sym: (True, t) for sym, t in out.items()}
        for sym, ks in lookaheads[q].items():
            if len(ks) > 1:
                ranked = sorted(ks, key=lambda k: -rules[k].priority)
                if rules[ranked[0]].priority <= rules[ranked[1]].priority:
                    listed = "".join(f"\n\t- <{rules[k].origin} : {' '.join(rules[k].expansion)}>" for k in sorted(ks))
                    collisions.append(f"Reduce/Reduce collision in Terminal('{sym}') between the following rules: {listed}")
                    continue
                ks = {ranked[0]}
            (k,) = ks
            if sym not in act:  # (shift/reduce: shift, as Lark's non-strict analysis)
                act[sym] = (False, (rules[k].origin, len(rules[k].expansion)))
        actions.append(act)
    if collisions:
        raise GrammarError("\n\n".join(collisions))
    return LalrTable(actions, 0, trans[0][start])
