"""Python regex syntax as the automata read it: the stdlib's parser, and character sets as code points.

    sre_parse.parse(pattern, 0) -> [(op, arg)], ops from sre_constants (LITERAL, IN, BRANCH, ...)
    class_item_ranges(op, arg, flags, where) -> Ranges: sorted, disjoint, inclusive code-point ranges

nfa.py compiles these sets to UTF-8 byte ranges; json_regex.py respells them as JSON string text.
`\\d`, `\\s` and `\\w` are read as Python's str regexes read them (Unicode unless re.ASCII).
"""

from __future__ import annotations

import functools
import re

import numpy as np

from loom.runtime.constrained.errors import GrammarError

__all__ = [
    "ALL_CODEPOINTS", "MAX_CODEPOINT", "REPEAT_OPS", "Ranges", "case_variants", "category_ranges", "class_item_ranges",
    "complement_ranges", "encodable_ranges", "normalise_ranges", "sre_constants", "sre_parse",
]  # fmt: skip

try:  # the stdlib's own regex parser (public as sre_parse before 3.11)
    import re._constants as sre_constants
    import re._parser as sre_parse
except ImportError:  # pragma: no cover - Python < 3.11
    import sre_constants  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

# Greedy, lazy and (3.11+) possessive repetitions: the automata read all three alike (same language).
REPEAT_OPS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, getattr(sre_constants, "POSSESSIVE_REPEAT", sre_constants.MAX_REPEAT))

MAX_CODEPOINT = 0x10FFFF
_ASCII = int(re.ASCII)  # a plain int: `int & re.ASCII` builds a RegexFlag enum each time
Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code-point ranges

ALL_CODEPOINTS: Ranges = [(0, 0xD7FF), (0xE000, MAX_CODEPOINT)]  # every code point UTF-8 can encode


def normalise_ranges(ranges: Ranges) -> Ranges:
    """Any ranges -> sorted, disjoint ones, adjacent ones merged."""
    out: Ranges = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def complement_ranges(ranges: Ranges) -> Ranges:
    """Every encodable code point not in `ranges`."""
    out: Ranges = []
    nxt = 0
    for lo, hi in normalise_ranges(ranges):
        if lo > nxt:
            out.append((nxt, lo - 1))
        nxt = hi + 1
    if nxt <= MAX_CODEPOINT:
        out.append((nxt, MAX_CODEPOINT))
    return encodable_ranges(out)


def encodable_ranges(ranges: Ranges) -> Ranges:
    """Drop the surrogates, which have no UTF-8 encoding."""
    out: Ranges = []
    for lo, hi in ranges:
        for a, b in ALL_CODEPOINTS:
            if max(lo, a) <= min(hi, b):
                out.append((max(lo, a), min(hi, b)))
    return out


def _every_codepoint() -> str:
    """Every code point in order, as one str (surrogates included; ~10 ms, 4.4 MB: not kept)."""
    return np.arange(MAX_CODEPOINT + 1, dtype=np.uint32).tobytes().decode("utf-32-le", "surrogatepass")


@functools.cache
def category_ranges(name: str, ascii_only: bool) -> tuple[tuple[int, int], ...]:
    """\\d, \\s, \\w (name DIGIT, SPACE, WORD) as Python's str regexes read them (Unicode unless
    re.ASCII): the runs `re` itself matches over every code point (~20-30 ms each, once per process;
    testing each of 1.1M code points in Python took 80-130 ms before the first regex's mask)."""
    if ascii_only:
        if name == "SPACE":  # re.ASCII's \s is C's isspace, without \x1c-\x1f
            return ((9, 13), (32, 32))
        text, flags = "".join(map(chr, range(0x80))), re.ASCII
    else:
        text, flags = _every_codepoint(), 0
    found = re.finditer({"DIGIT": r"\d+", "SPACE": r"\s+", "WORD": r"\w+"}[name], text, flags)
    return tuple((m.start(), m.end() - 1) for m in found)


def case_variants(ranges: Ranges) -> Ranges:
    """`ranges` plus the other cases of their characters (re.IGNORECASE)."""
    extra: Ranges = []
    for lo, hi in ranges:
        for cp in range(lo, min(hi, lo + 4096) + 1):  # wide ranges fold mostly into themselves
            ch = chr(cp)
            for v in {ch.lower(), ch.upper(), ch.swapcase()}:
                if len(v) == 1:
                    extra.append((ord(v), ord(v)))
    return normalise_ranges(ranges + extra)


def class_item_ranges(op: object, av: object, flags: int, where: str) -> Ranges:
    """The code points of one item of a character class (a literal, a range, \\d / \\s / \\w and
    their negations). Raises GrammarError naming `where` for any other item."""
    ascii_only = bool(flags & _ASCII)
    if op is sre_constants.LITERAL:
        return [(av, av)]  # type: ignore[list-item]
    if op is sre_constants.RANGE:
        return [av]  # type: ignore[list-item]
    if op is sre_constants.CATEGORY:
        name = str(av).removeprefix("CATEGORY_")
        negated = name.startswith("NOT_")
        base = list(category_ranges(name.removeprefix("NOT_"), ascii_only))
        return complement_ranges(base) if negated else base
    raise GrammarError(f"{where}: unsupported character-class item {op} {av!r}")
