"""Lark's `%import` of terminals from its own library, read once per process instead of once per grammar.

Lark's `GrammarBuilder.do_import` parses the whole imported file (`common.lark`, ~60 definitions)
and copies every definition for each grammar that imports a name from it, ~4 ms of a small
grammar's ~10 ms load, then keeps the imported names alone. An imported terminal's kept
definition is its own pattern with every terminal it names inlined (Lark resolves terminal
references before it drops the unused), so it depends on nothing but the name: the library is
read here once, and each import gets a copy of the resolved tree under its alias. Imports of
rules, from files of the user's (a relative import, import paths) or of names the library lacks
run Lark's own code. `library_pattern` gives lark_plain.py an imported terminal's compiled pattern
(Lark's own transformers run once per name and process).
"""

from __future__ import annotations

import copy
import threading

_LOCK = threading.Lock()
_LIBRARIES: dict[tuple[str, ...], dict] = {}  # dotted path -> the library's definitions, resolved
_PATTERNS: dict[tuple[tuple[str, ...], str], object] = {}  # (dotted path, terminal) -> its lark Pattern, or None
replaced: list = []  # Lark's own do_import, once installed


def _library(dotted_path: tuple[str, ...], keep_all_tokens: bool) -> dict:
    from lark import load_grammar

    with _LOCK:
        found = _LIBRARIES.get(dotted_path)
    if found is None:
        grammar_path = "/".join(dotted_path) + load_grammar.EXT
        joined_path, text = load_grammar.stdlib_loader(None, grammar_path)
        builder = load_grammar.GrammarBuilder(keep_all_tokens)
        builder.load_grammar(text, joined_path)
        found = builder._definitions
        with _LOCK:
            _LIBRARIES[dotted_path] = found
    return found


def _cached_import(self, dotted_path, base_path, aliases, base_mangle=None) -> None:
    original = replaced[0]
    if base_path is not None or base_mangle is not None or self.import_paths:
        return original(self, dotted_path, base_path, aliases, base_mangle)
    try:
        library = _library(tuple(dotted_path), self.global_keep_all_tokens)
    except OSError:  # (not in the library: Lark's own search, and its message)
        return original(self, dotted_path, base_path, aliases, base_mangle)
    if not all(name in library and library[name].is_term for name in aliases):
        return original(self, dotted_path, base_path, aliases, base_mangle)
    from lark.exceptions import GrammarError

    for alias in aliases.values():
        if alias in self._definitions:  # (Lark's own message)
            raise GrammarError(f"Cannot import '{alias}' from '{'/'.join(dotted_path)}.lark': Symbol already defined.")
    for name, alias in aliases.items():
        self._definitions[alias] = copy.deepcopy(library[name])


def install() -> bool:
    """Put the cached import in Lark's GrammarBuilder (once). False where Lark's class is not the
    one expected (no `do_import`): Lark's own runs."""
    from lark import load_grammar

    builder = getattr(load_grammar, "GrammarBuilder", None)
    with _LOCK:
        if getattr(builder, "do_import", None) is _cached_import:
            return True
        if not callable(getattr(builder, "do_import", None)):
            return False
        if not replaced:
            replaced.append(builder.do_import)
        builder.do_import = _cached_import
        return True


def library_pattern(dotted_path: tuple[str, ...], name: str):
    """The lark Pattern that Lark's compile makes of terminal `name` of its library `dotted_path`
    (e.g. ("common",), "WS"), or None where the library has no such terminal."""
    key = (dotted_path, name)
    with _LOCK:
        if key in _PATTERNS:
            return _PATTERNS[key]
    try:
        from lark.load_grammar import PrepareLiterals, TerminalTreeToPattern, nr_deepcopy_tree

        definition = _library(dotted_path, False).get(name)
    except (ImportError, OSError):  # (not in the library; a Lark without these pieces: Lark imports it)
        definition = None
    pattern = None
    if definition is not None and definition.is_term and definition.tree is not None:
        pattern = (PrepareLiterals() * TerminalTreeToPattern()).transform(nr_deepcopy_tree(definition.tree))
    with _LOCK:
        _PATTERNS[key] = pattern
    return pattern


def warm_library(dotted_path: tuple[str, ...] = ("common",)) -> None:
    """Every terminal pattern of a library, ahead (Lark's `common`: 27 terminals, ~10 ms once)."""
    for name, definition in _library(dotted_path, False).items():
        if definition.is_term:
            library_pattern(dotted_path, name)
