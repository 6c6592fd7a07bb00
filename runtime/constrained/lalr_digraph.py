"""DeRemer and Pennello's digraph algorithm, for the LALR(1) look-ahead sets (lalr.py), without recursion.

Lark's own (`lark.parsers.lalr_analysis.digraph`) recurses once per state along a relation
chain: a large grammar's chain (a JSON schema with hundreds of properties) passes Python's default
limit of 1,000 calls, or not, by the order the hash seed gives Lark's sets, and fails with a
RecursionError. Raising the limit is no fix: the limit is the whole process's, and in other
threads it is what stops a deeply nested JSON body or schema before it overflows the C stack.
`digraph` below is the same algorithm, with the same visiting order and the same sets (the result
shares set objects with `G` exactly as Lark's does), on an explicit stack.
"""

from __future__ import annotations

from typing import Any


def digraph(X: Any, R: Any, G: Any) -> dict:  # noqa: N803 - the algorithm's (and Lark's) names
    """F(x) = G(x) ∪ the union of F(y) over every y reachable from x by R, where each strongly
    connected component shares one set (DeRemer and Pennello, 1982). X: the nodes in visiting
    order; R[x]: the nodes x relates to; G[x]: x's own set (updated in place, as Lark's is)."""
    F: dict = {}
    S: list = []  # the nodes on the current path and its unfinished components
    N = dict.fromkeys(X, 0)  # 0: unvisited; d: its depth on S (lowered to its component's root); -1: done
    for x in X:
        if N[x] == 0:
            _traverse(x, S, N, R, G, F)
    return F


def _traverse(x0: Any, S: list, N: dict, R: Any, G: Any, F: dict) -> None:
    def enter(x: Any) -> list:
        S.append(x)
        N[x] = len(S)
        F[x] = G[x]
        return [x, len(S), iter(R[x]), None]  # (node, its depth, its relations left, the one being traversed)

    def close(x: Any, y: Any) -> None:  # the edge x -> y, once y is traversed
        if 0 < N[y] < N[x]:
            N[x] = N[y]
        F[x].update(F[y])

    work = [enter(x0)]
    while work:
        frame = work[-1]
        x, d, relations, pending = frame
        if pending is not None:
            close(x, pending)
            frame[3] = None
        for y in relations:
            if N[y] == 0:
                frame[3] = y
                work.append(enter(y))
                break
            close(x, y)
        else:
            work.pop()
            if N[x] == d:  # x roots a component: every node above it on S shares its set
                f_x = F[x]
                while True:
                    z = S.pop()
                    N[z] = -1
                    F[z] = f_x
                    if z == x:
                        break
