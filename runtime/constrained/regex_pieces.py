"""A regex with some sub-regexes left out, so that each is parsed once per process, not once per schema.

    RegexPieces.fill(template, subs, pieces) -> RegexPieces | None   a schema's regex, its pieces as sentinels
    nfa.build_nfa(pieces.regex, pieces=pieces.texts)                 splices each piece's cached NFA fragment

A JSON Schema's regex is mostly the same few automata pasted in many places: a `date-time` format
(~1.5k characters of regex), an email, a string pattern, any JSON value, a number range, and
outlines-core's own string and number regexes. Python's regex parser and the NFA build read every
copy of every one of them again for each new schema (2-50 ms on format-heavy schemas). Here each
such piece stands in the regex as a sentinel, `(?:` a private code point naming the piece, then
PIECE_END `)`. nfa.build_nfa splices the piece's NFA fragment, built once per process
(nfa.piece_fragment, an LRU bounded by NFA states), where it meets the sentinel.

Why two characters: Python's parser folds a branch of single characters into a character set
(`(?:a|b)` -> `[ab]`), which would hide a one-character sentinel inside a set; every alternative
holding a sentinel has at least two items, so it never folds. PIECE_END alone reads as the empty
string. The group makes a quantifier after the sentinel repeat the whole piece. The sentinels are code points no schema needs (U+10FF00-U+10FFFD, private use); a template
or piece that spells one (raw or escaped) keeps the plain regex instead (`clashes`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loom.runtime.constrained.regex_syntax import sre_constants, sre_parse

PIECE_BASE = 0x10FF00  # piece k's sentinel is PIECE_BASE + k
PIECE_END = 0x10FFFD  # follows every piece sentinel; read as nothing
MAX_PIECES = PIECE_END - PIECE_BASE  # more pieces than this in one regex: the rest are pasted as text

_CLASH = re.compile(r"[\U0010ff00-\U0010fffd]|\\U0010ff(?:[0-9a-e][0-9a-f]|f[0-9a-d])", re.IGNORECASE)  # not \U0010ffff


def clashes(text: str) -> bool:
    """Whether `text` may spell a sentinel code point (raw or as a \\U escape; conservative)."""
    return _CLASH.search(text) is not None


@dataclass(frozen=True, slots=True)
class RegexPieces:
    """A regex whose pieces stand as sentinels, and the pieces' regexes by sentinel code point."""

    regex: str
    texts: dict[int, str]

    @staticmethod
    def fill(template: str, subs: list[str], pieces: set[int], placeholder: str, atoms: tuple[str, ...] = ()) -> RegexPieces | None:
        """`template` with each `placeholder.format(i)` replaced by `(subs[i])`, except the subs in
        `pieces`, which become sentinels. A sub may hold the placeholders of earlier subs (never of
        later ones) and pieces hold none. `atoms`: regexes that are whole units wherever they stand
        in the filled template (outlines-core's string and number regexes), made pieces too where no
        quantifier follows and no backslash precedes (longest first). None where a text could spell
        a sentinel, or nothing is a piece."""
        if clashes(template) or any(clashes(s) for s in subs):
            return None
        texts: dict[int, str] = {}

        def sentinel(text: str) -> str:  # a group, so that a quantifier after it repeats the whole piece
            cp = PIECE_BASE + len(texts)
            texts[cp] = text
            return f"(?:{chr(cp)}{chr(PIECE_END)})"

        for i in reversed(range(len(subs))):
            if i in pieces and len(texts) < MAX_PIECES:
                template = template.replace(placeholder.format(i), sentinel(subs[i]))
            else:
                template = template.replace(placeholder.format(i), f"({subs[i]})")
        for atom in sorted(atoms, key=len, reverse=True):
            if atom in template and len(texts) < MAX_PIECES:
                piece = sentinel(atom)
                free = "" if _one_group(atom) else "(?![*+?{])"  # a quantifier after `a(b)` repeats only `(b)`
                template = re.sub(f"(?<!\\\\){re.escape(atom)}{free}", lambda _: piece, template)
        return RegexPieces(template, texts) if texts else None


def _one_group(regex: str) -> bool:
    """Whether `regex` is one parenthesised group, so that a quantifier after it repeats all of it."""
    parsed = sre_parse.parse(regex, 0).data
    return len(parsed) == 1 and parsed[0][0] is sre_constants.SUBPATTERN and regex.startswith("(") and regex.endswith(")")
