"""Grammars and schemas shared by the constrained-decoding tests, and the two views of a compiled
grammar's mask they compare (the fast mask, every token walked by brute force)."""

import random

from loom.runtime.constrained import TokenVocab, allocate_token_bitmask, unpack_bitmask
from loom.runtime.constrained.vocabulary import byte_decoder
from loom.tiny_tokenizer import tiny_tokenizer


def tiny_vocab(extra: list[bytes], eos: int = 0) -> TokenVocab:
    """The tiny trained byte-level BPE vocabulary (1024 ids, specials 0-2 left out) plus `extra`
    hand-made tokens at ids 1024 on (tokens that cross lexeme ends)."""
    tok = tiny_tokenizer(1024)
    dec = byte_decoder()
    tb = {i: bytes(dec[c] for c in s) for s, i in tok.get_vocab().items() if i >= 3}
    for k, b in enumerate(extra):
        tb[1024 + k] = b
    return TokenVocab.build(tb, 1024 + len(extra), frozenset({eos}))


def allowed_tokens(compiled, state) -> set[int]:
    """The token ids `compiled`'s mask allows at `state`."""
    row = allocate_token_bitmask(1, compiled.vocab.vocab_size)
    row[0].copy_(compiled.mask(state)[0])
    return set(unpack_bitmask(row, compiled.vocab.vocab_size)[0].nonzero().view(-1).tolist())


def random_walk(compiled, seed: int, steps: int, prefer: set[int], p: float, eos: int) -> list[frozenset[int]]:
    """The states along a random walk of `compiled`'s masks, taking a token of `prefer` with
    probability p where one is allowed (tokens that cross lexeme ends, open levels, ...)."""
    rnd = random.Random(seed)
    g = compiled.matcher()
    states = [g.state]
    for _ in range(steps):
        allowed = sorted(allowed_tokens(compiled, g.state) - {eos})
        if not allowed:
            break
        pool = [t for t in allowed if t in prefer]
        g.accept_token(rnd.choice(pool if pool and rnd.random() < p else allowed))
        states.append(g.state)
    return states


def brute_force_tokens(compiled, state, eos: int) -> set[int]:
    """Every token fed byte by byte through the lexer and parser from `state` (no scan, no trie)."""
    out = {t for t, b in compiled.vocab.by_id.items() if compiled.walk(state, b)}
    return out | {eos} if compiled.can_end(state) else out


JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
"""
ARITH_GBNF = r"""
root ::= expr
expr ::= term (ws [-+] ws term)*
term ::= factor (ws [*/] ws factor)*
factor ::= [0-9]+ ("." [0-9]+)? | "(" ws expr ws ")" | "-" factor
ws ::= " "?
"""
JSON_LARK = r"""
start: value
?value: dict | list | ESCAPED_STRING | SIGNED_NUMBER | "true" | "false" | "null"
list : "[" [value ("," value)*] "]"
dict : "{" [pair ("," pair)*] "}"
pair : ESCAPED_STRING ":" value
%import common.ESCAPED_STRING
%import common.SIGNED_NUMBER
%import common.WS
%ignore WS
"""
# After a number, "+" may come (no digit: its splits inside the digits are dead) or, after "h", a
# hexadecimal literal that starts with a digit ("h120xab" is 12 then 0xab: a split inside the run).
DIGITS_LARK = r"""
start: item ("," item)*
item: NUM "+" NUM | "h" NUM HEX | "(" start ")"
NUM: /[0-9]+/
HEX: /0x[a-f]+/
"""
CHOICES_GBNF = r'root ::= ("cat" | "dog" | "bird" | "日本" | "élan") ("s")? ("," " "? root)?'

# A small extraction schema: bounded strings and integers, a boolean, an enum array with a non-ASCII member.
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "é"]}, "maxItems": 3},
    },
    "required": ["name", "age", "ok"],
}


def slow_gbnf(rules: int = 1200) -> str:
    """A GBNF grammar of `rules` tangled rules, whose compile takes ~1.6 s at 1,200 (~0.45 s at
    400; the LALR tables and the terminals' automata): a real compile, in Python, that runs past a
    short timeout (regexes no longer do: their DFAs are built as masks reach their states)."""
    body = [f'r{i} ::= "k{i}" r{i + 1} | "j{i}" r{i * 7 % rules} ("," r{i * 3 % rules})* | "z"' for i in range(rules)]
    return "\n".join(["root ::= r0", *body, f'r{rules} ::= "end"'])


def reachable_rules(rules: list, start: str) -> set:
    """The BNF rules (lalr.Rule) `start` reaches: what two compilers of one grammar must agree on
    (what else each keeps differs: Lark keeps unreachable cycles)."""
    seen, todo, out = {start}, [start], set()
    while todo:
        name = todo.pop()
        for r in rules:
            if r.origin == name:
                out.add(r)
                for s in r.expansion:
                    if s not in seen:
                        seen.add(s)
                        todo.append(s)
    return out


def canonical_table(actions: dict, start: int, end: int):
    """An LALR table ({state: {symbol: (shift, arg)}}) with its states numbered in the order a walk
    from the start meets them, shifts in symbol order (builders number states differently)."""
    order: dict[int, int] = {}
    work = [start]
    while work:
        q = work.pop(0)
        if q not in order:
            order[q] = len(order)
            work += [arg for _, (shift, arg) in sorted(actions[q].items()) if shift]
    table = {
        order[q]: sorted((sym, shift, order[arg] if shift else arg) for sym, (shift, arg) in acts.items())
        for q, acts in actions.items()
        if q in order
    }
    return table, order[end]
