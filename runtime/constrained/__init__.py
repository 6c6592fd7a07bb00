"""Constrained decoding: grammars (regex, JSON Schema, EBNF / Lark) as per-request token masks.

    GrammarBackend.compile(kind, source) -> Future[compiled grammar] -> .matcher() -> Grammar
    Grammar (grammar.py): accept_token, fill_mask, allowed_ids, is_terminated, forced_bytes, rollback, copy
    bitmask: allocate_token_bitmask, apply_token_bitmask_

Loom's own backend: regexes and JSON Schemas on byte DFAs (regex_dfa.py; schema.py turns a schema
into a regex, schema_grammar.py into a grammar where no regex will do), GBNF and Lark on LALR tables
(ebnf.py). xgrammar_backend.py and llguidance_backend.py wrap those libraries' compilers.
"""

from loom.runtime.constrained.backend import GRAMMAR_KINDS, GrammarBackend, grammar_source
from loom.runtime.constrained.bitmask import allocate_token_bitmask, apply_token_bitmask_, pack_allowed, unpack_bitmask
from loom.runtime.constrained.ebnf import CompiledEbnf, EbnfGrammar, compile_grammar
from loom.runtime.constrained.errors import ErrorKind, GrammarError
from loom.runtime.constrained.grammar import Grammar
from loom.runtime.constrained.regex_dfa import CompiledRegex, RegexGrammar
from loom.runtime.constrained.schema import schema_to_regex
from loom.runtime.constrained.vocabulary import TokenVocab, token_bytes

__all__ = [
    "GRAMMAR_KINDS", "CompiledEbnf", "CompiledRegex", "EbnfGrammar", "ErrorKind", "Grammar", "GrammarBackend", "GrammarError",
    "RegexGrammar", "TokenVocab", "allocate_token_bitmask", "apply_token_bitmask_", "compile_grammar", "grammar_source",
    "pack_allowed", "schema_to_regex", "token_bytes", "unpack_bitmask",
]  # fmt: skip
