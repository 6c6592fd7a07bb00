"""Constrained decoding: grammars (regex, JSON Schema, EBNF / Lark) as per-request token masks.

    GrammarBackend.compile(kind, source) -> Future[CompiledRegex] -> .matcher() -> RegexGrammar
    RegexGrammar, EbnfGrammar: accept_token, fill_mask, is_terminated, rollback, copy
    bitmask: allocate_token_bitmask, apply_token_bitmask_
"""

from loom.runtime.constrained.backend import GRAMMAR_KINDS, GrammarBackend, grammar_source
from loom.runtime.constrained.bitmask import allocate_token_bitmask, apply_token_bitmask_, pack_allowed, unpack_bitmask
from loom.runtime.constrained.ebnf import CompiledEbnf, EbnfGrammar, TokenVocab, compile_grammar
from loom.runtime.constrained.errors import GrammarError
from loom.runtime.constrained.regex_dfa import CompiledRegex, RegexGrammar
from loom.runtime.constrained.schema import schema_to_regex
from loom.runtime.constrained.vocabulary import token_bytes

__all__ = [
    "GRAMMAR_KINDS", "CompiledEbnf", "CompiledRegex", "EbnfGrammar", "GrammarBackend", "GrammarError", "RegexGrammar", "allocate_token_bitmask",
    "apply_token_bitmask_", "grammar_source", "pack_allowed", "schema_to_regex", "token_bytes", "unpack_bitmask",
    "TokenVocab", "compile_grammar",
]  # fmt: skip
