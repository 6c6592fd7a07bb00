"""EBNF grammars (GBNF and Lark syntax): hand-made vocabularies where the right mask is known, every
GBNF construct one by one, errors, a real tokenizer checked against brute force, random sampling
checked by Lark's own Earley parser, and the engine end to end."""

from __future__ import annotations

import json

import lark
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.runtime.constrained import (
    GrammarBackend,
    GrammarError,
    TokenVocab,
    allocate_token_bitmask,
    apply_token_bitmask_,
    compile_grammar,
    token_bytes,
    unpack_bitmask,
)
from loom.runtime.constrained.ebnf_gbnf import Alt, Chars, Lit, Ref, Rep, Seq, _class_regex, _cp, parse_gbnf
from loom.runtime.entrypoints.engine import LocalEngine
from loom.tiny_tokenizer import tiny_tokenizer

from grammars import ARITH_GBNF, CHOICES_GBNF, JSON_GBNF, JSON_LARK
from reference_dfa import regex_to_dfa  # tests/support: the 256-column construction, as a reference

EOS = 0
TOY = {
    1: b"a", 2: b"b", 3: b"ab", 4: b"c", 5: b"\xc3", 6: b"\xa9", 7: b"\xc3\xa9", 8: b"1", 9: b"2", 10: b"-",
    11: b"0", 12: b"[", 13: b"]", 14: b",", 15: b"1,", 16: b" ", 17: b"],", 18: b"x", 19: b"]]",
}  # fmt: skip
V = 40
BYTES = {b + 1: bytes([b]) for b in range(256)}  # one token per byte: any string can be fed
LIST = r"""
root ::= "[" ws (item ("," ws item)*)? "]"   # a list
item ::= [0-9]+ | "é" | root
ws ::= " "?
"""


def allowed(grammar, vocab_size: int = V) -> list[int]:
    row = allocate_token_bitmask(1, vocab_size)
    grammar.fill_mask(row[0])
    return unpack_bitmask(row, vocab_size)[0].nonzero().view(-1).tolist()


@pytest.fixture(scope="module")
def toy() -> TokenVocab:
    return TokenVocab.build(TOY, V, frozenset({EOS}))


@pytest.fixture(scope="module")
def byte_vocab() -> TokenVocab:
    return TokenVocab.build(BYTES, 258, frozenset({EOS}))


def accepts(vocab: TokenVocab, kind: str, source: str, text: str) -> bool:
    """Feed `text` byte by byte (each byte must be in the mask it is fed under), then EOS."""
    g = compile_grammar(kind, source, vocab).matcher()
    for b in text.encode():
        ok = g.accept_token(b + 1)
        row = allocate_token_bitmask(1, 258)
        if ok:
            g.rollback(1)
        g.fill_mask(row[0])
        assert ok == bool(unpack_bitmask(row, 258)[0, b + 1]), "the mask and accept_token disagree"
        if not ok:
            return False
        g.accept_token(b + 1)
    return g.accept_token(EOS)


# ----------------------------------------------------------------------------- toy vocabularies


def test_masks_on_a_toy_vocabulary(toy):
    g = compile_grammar("ebnf", LIST, toy).matcher()
    assert allowed(g) == [12]  # only "["
    assert g.forced_bytes() == b"["
    assert g.accept_token(12)
    # an item, a nested list, "]", a space; "1," ends a number and starts the separator;
    # "\xc3" is half of "é"; "]]" would close more lists than are open
    assert allowed(g) == [5, 7, 8, 9, 11, 12, 13, 15, 16]
    assert g.accept_token(15) and g.accept_token(16)  # "[1, "
    assert allowed(g) == [5, 7, 8, 9, 11, 12, 15]  # no "]" right after ", "
    assert g.accept_token(5) and allowed(g) == [6]  # the byte that completes "é"
    assert g.forced_bytes() == b"\xa9"
    assert g.accept_token(6) and allowed(g) == [13, 14]
    assert not g.accept_token(17)  # "]," after the outer list has closed: refused, state unchanged
    assert g.accept_token(13) and allowed(g) == [EOS]
    assert g.is_terminated() and not g.finished
    assert g.accept_token(EOS) and g.is_terminated() and not g.accept_token(13)


def test_tokens_spanning_terminals_in_nested_lists(toy):
    g = compile_grammar("ebnf", LIST, toy).matcher()
    for t in (12, 12, 15, 8):  # "[[1,1"
        assert g.accept_token(t), t
    assert {17, 19} <= set(allowed(g))  # "]," closes the inner list and separates; "]]" closes both
    h = g.copy()
    assert g.accept_token(19) and allowed(g) == [EOS]
    assert h.accept_token(17) and 13 not in allowed(h) and 19 not in allowed(h)  # an item must follow ","


def test_eos_only_where_the_grammar_may_end(toy):
    g = compile_grammar("ebnf", 'root ::= "a"+ "b"?', toy).matcher()
    assert EOS not in allowed(g) and not g.accept_token(EOS)
    assert g.accept_token(1)
    assert allowed(g) == [EOS, 1, 2, 3]
    assert not g.is_terminated()
    assert g.accept_token(2) and allowed(g) == [EOS] and g.is_terminated()


def test_rollback_and_copy_are_independent(toy):
    g = compile_grammar("ebnf", 'root ::= ("a" | "b")* "c"', toy).matcher()
    assert g.accept_token(1) and g.accept_token(2)
    h = g.copy()
    assert h.accept_token(4) and h.is_terminated()
    assert not g.is_terminated() and allowed(g) == [1, 2, 3, 4]
    g.rollback(2)
    assert allowed(g) == [1, 2, 3, 4]
    assert g.accept_token(4) and g.is_terminated()
    g.accept_token(EOS)
    g.rollback(1)
    assert not g.finished and g.accept_token(EOS)
    with pytest.raises(ValueError, match="cannot roll back"):
        g.rollback(5)


def test_forced_bytes(toy):
    c = compile_grammar("ebnf", 'root ::= "ab" ("cab" | "cxy") | "é"', toy)
    g = c.matcher()
    assert g.forced_bytes() == b""  # "a" or "\xc3"
    assert g.accept_token(1) and g.forced_bytes() == b"bc"  # then "a" or "x"
    assert g.accept_token(2) and g.accept_token(4) and g.accept_token(18) and g.forced_bytes() == b"y"
    h = c.matcher()
    assert h.accept_token(5) and h.forced_bytes() == b"\xa9"
    e = compile_grammar("ebnf", 'root ::= "a" "b"?', toy).matcher()
    assert e.accept_token(1) and e.forced_bytes() == b""  # EOS is a continuation too


# ----------------------------------------------------------------------------- GBNF, construct by construct

CASES = [
    ('root ::= "abc"', ["abc"], ["", "ab", "abcd"]),
    (r'root ::= "a\"b\\c\n\t\x41\u00e9\U0001F600"', ['a"b\\c\n\tAé😀'], ["a"]),
    ("root ::= [a-c]", ["a", "b", "c"], ["d", "", "ab"]),
    ("root ::= [^a-c\\n]", ["d", "é", "日"], ["a", "\n", ""]),
    (r"root ::= [\x41-\x43\u00e9\]\-]", ["A", "C", "é", "]", "-"], ["D", "\\"]),
    ("root ::= .", ["x", "\n", "日"], ["", "xy"]),
    ('root ::= "a" | "b" "c"', ["a", "bc"], ["b", "ac"]),
    ('root ::= ("a" | "b") "c"', ["ac", "bc"], ["c", "abc"]),
    ('root ::= "a"* "b"', ["b", "ab", "aaab"], ["a", "ba"]),
    ('root ::= "a"+', ["a", "aaa"], [""]),
    ('root ::= "a"? "b"', ["b", "ab"], ["aab"]),
    ('root ::= "a"{3}', ["aaa"], ["aa", "aaaa"]),
    ('root ::= "a"{2,}', ["aa", "aaaaa"], ["a"]),
    ('root ::= "a"{1,3}', ["a", "aaa"], ["", "aaaa"]),
    ('root ::= "a"{,2} "b"', ["b", "ab", "aab"], ["aaab"]),
    ('root ::= "x" ( "ab" ){0,2} "y"', ["xy", "xaby", "xababy"], ["xabababy"]),
    ('# a comment\nroot ::= item  # trailing\n# another\nitem ::= "i"', ["i"], ["item"]),
    ('root ::=\n  "a"\n  | "b"\n\nother ::= "z"', ["a", "b"], ["z"]),
    ('root ::= (\n  "a"\n  "b"\n)', ["ab"], ["a"]),
    ('root ::= x y\nx ::= "x"\ny ::= x | "y"', ["xx", "xy"], ["x", "yy"]),
    ('root ::= "(" root ")" | ""', ["", "()", "(())"], ["(", "())", ")("]),
    ('root ::= e\ne ::= t ("+" t)*\nt ::= [0-9]+ | "(" e ")"', ["1+2", "(1+2)+3", "((4))"], ["1+", "(1", "+"]),
    ('root ::= "a" ws "b"\nws ::= | " " | "\\n" [ \\t]{0,2}', ["ab", "a b", "a\n\t b"], ["a  b", "a\n   b"]),
]


@pytest.mark.parametrize("source, good, bad", CASES, ids=[c[0][:40] for c in CASES])
def test_gbnf_constructs(byte_vocab, source, good, bad):
    for text in good:
        assert accepts(byte_vocab, "ebnf", source, text), (source, text)
    for text in bad:
        assert not accepts(byte_vocab, "ebnf", source, text), (source, text)


def test_lark_syntax(byte_vocab):
    grammar = JSON_LARK
    for text in ['{"a": [1, -2.5e3, "x\\"y"], "b" :true}', "[]", ' [ null ] ', '"s"']:
        assert accepts(byte_vocab, "lark", grammar, text), text
    for text in ['{"a" 1}', "[1,]", '"unterminated', "nul"]:
        assert not accepts(byte_vocab, "lark", grammar, text), text


def test_overlapping_terminals_split_every_way(byte_vocab):
    # NAME NAME with no separator: "abc" splits as a|bc or ab|c; a longest-match lexer would refuse it
    grammar = "start: NAME NAME\nNAME: /[a-z]+/\n"
    assert accepts(byte_vocab, "lark", grammar, "abc")
    assert not accepts(byte_vocab, "lark", grammar, "a")


INVALID = [
    ("ebnf", 'root ::= "a" |\nfoo ::= "b" )', r"line 2 column 13: got '\)'"),
    ("ebnf", 'root ::= "a" missing', r"rule 'root' uses 'missing', which is not defined"),
    ("ebnf", 'start ::= "a"', r"no 'root' rule"),
    ("ebnf", r'root ::= "\q"', r"unknown escape \\q"),
    ("ebnf", r'root ::= "\x4"', r"\\x must be followed by 2 hex digits"),
    ("ebnf", "root ::= [z-a]", r"range 'z'-'a' is backwards"),
    ("ebnf", 'root ::= "a"{3,1}', r"upper bound is below the lower"),
    ("ebnf", 'root ::= "a"\nroot ::= "b"', r"line 2: rule 'root' is defined twice"),
    ("ebnf", 'root ::= "a" "b', r"line 1 column 14"),
    ("ebnf", "root ::= []", r"character class \[\] is empty"),
    ("ebnf", 'root ::= a | b\na ::= x "1"\nb ::= x "1"\nx ::= "(" x ")" | "y"', r"Reduce/Reduce collision"),
    ("lark", 'foo: "a"', r"lark grammar: .*start"),
    ("lark", 'start: "a" \nfoo', r"lark grammar"),
    ("lark", "start: X\nX: /(?<=a)b/", r"terminal X: look-aheads / look-behinds cannot be compiled"),
    ("lark", "start: X\nX: /a*/", r"(terminal X|zero-width)"),
]


@pytest.mark.parametrize("kind, source, message", INVALID, ids=[s[:30] for _, s, _ in INVALID])
def test_invalid_grammars_name_the_problem(toy, kind, source, message):
    with pytest.raises(GrammarError, match=message):
        compile_grammar(kind, source, toy)


def test_backend_compiles_and_caches_ebnf_and_lark():
    backend = GrammarBackend(TOY, V, frozenset({EOS}))
    fut = backend.compile("ebnf", LIST)
    assert backend.compile("ebnf", LIST) is fut
    g = fut.result(timeout=30).matcher()
    assert allowed(g) == [12]
    h = backend.compile("lark", 'start: "a"+').result(timeout=30).matcher()
    assert allowed(h) == [1] and h.accept_token(1) and allowed(h) == [EOS, 1]
    with pytest.raises(GrammarError, match="not defined"):
        backend.compile("ebnf", "root ::= nope").result(timeout=30)
    backend.shutdown()


def test_byte_dfa_matches_python_re():
    import re

    rnd = __import__("random").Random(0)
    alphabet = 'aAbxé日"\\019.-+e \n_'
    for pattern in [r"(?i:ab)[^a-c\d]x*?.{2,}", r'"(?:[^"\\]|\\.)*"', r"[a-zé日]+", r"-?\d+(\.\d+)?", r"\w+\s?", r"[^\n]{0,3}x"]:
        dfa, rx = regex_to_dfa(pattern), re.compile(pattern)
        for _ in range(500):
            s = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 6)))
            assert bool(rx.fullmatch(s)) == dfa.matches(s.encode()), (pattern, s)


# ----------------------------------------------------------------------------- a real tokenizer



def earley_oracle(gbnf: str) -> lark.Lark:
    """An independent reading of GBNF for checking outputs: one Lark rule per GBNF rule, one
    terminal per literal or class, parsed by Earley (which needs neither LALR nor regex folding)."""
    rules = parse_gbnf(gbnf)
    name = {r: f"r{i}" for i, r in enumerate(rules)}

    def ex(e) -> str:
        if isinstance(e, Lit):
            return f"/{''.join(_cp(ord(c)) for c in e.text)}/" if e.text else "()"
        if isinstance(e, Chars):
            return f"/{_class_regex(e)}/"
        if isinstance(e, Ref):
            return name[e.name]
        if isinstance(e, Seq):
            return "(" + " ".join(ex(x) for x in e.items) + ")"
        if isinstance(e, Alt):
            return "(" + " | ".join(ex(x) for x in e.options) + ")"
        assert isinstance(e, Rep)
        inner = ex(e.item)
        if e.hi is None:
            return f"(({inner} ~ {e.lo}) {inner}*)" if e.lo else f"({inner})*"
        return f"({inner} ~ {e.lo}..{e.hi})" if e.lo else f"({inner} ~ 1..{e.hi})?" if e.hi else "()"

    source = "\n".join(f"{name[r]}: {ex(e)}" for r, e in rules.items())
    return lark.Lark(source, parser="earley", lexer="dynamic_complete", start=name["root"])


@pytest.fixture(scope="module")
def real_vocab() -> TokenVocab:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer(2048), eos_token="<|endoftext|>")
    return TokenVocab.build(token_bytes(tok), 2048, frozenset({EOS}))


def sample(compiled, gen: torch.Generator, vocab_size: int, max_tokens: int = 120) -> tuple[bytes, bool]:
    """Sample at temperature 1.0 over random logits under the mask; (bytes, ended with EOS)."""
    g = compiled.matcher()
    out = b""
    # Tokens that close a string, object or array are favoured, so that JSON values end often enough.
    closers = torch.tensor([2.0 if any(c in compiled.vocab.by_id.get(i, b"") for c in b'"}]') else 0.0 for i in range(vocab_size)])
    for _ in range(max_tokens):
        logits = torch.randn(1, vocab_size, generator=gen) * 2 + closers
        logits[0, EOS] += 2.0  # end when allowed, often enough to finish
        row = allocate_token_bitmask(1, vocab_size)
        g.fill_mask(row[0])
        apply_token_bitmask_(logits, row)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        assert g.accept_token(token), token
        if token == EOS:
            return out, True
        out += compiled.vocab.by_id[token]
    return out, False


@pytest.mark.parametrize("source", [JSON_GBNF, ARITH_GBNF, CHOICES_GBNF], ids=["json", "arith", "choices"])
def test_real_tokenizer_masks_equal_brute_force(real_vocab, source):
    compiled = compile_grammar("ebnf", source, real_vocab)
    gen = torch.Generator().manual_seed(0)
    g = compiled.matcher()
    for step in range(40):
        fast = set(allowed(g, 2048))
        brute = {t for t, b in real_vocab.by_id.items() if compiled.walk(g.state, b)}
        if compiled.can_end(g.state):
            brute.add(EOS)
        assert fast == brute, (step, sorted(fast ^ brute)[:10])
        logits = torch.randn(1, 2048, generator=gen)
        row = allocate_token_bitmask(1, 2048)
        g.fill_mask(row[0])
        apply_token_bitmask_(logits, row)
        token = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
        if token == EOS or not fast - {EOS}:
            break
        assert g.accept_token(token)


SAMPLED_GRAMMARS = {"json": JSON_GBNF, "arith": ARITH_GBNF, "choices": CHOICES_GBNF}
_COMPILED: dict[str, object] = {}


def compiled_for(which: str, vocab: TokenVocab):
    if which not in _COMPILED:  # shared across examples, as a server shares a compiled grammar
        _COMPILED[which] = compile_grammar("ebnf", SAMPLED_GRAMMARS[which], vocab)
    return _COMPILED[which]


def check_sampled(which: str, text: bytes) -> None:
    earley_oracle(SAMPLED_GRAMMARS[which]).parse(text.decode("utf-8"))  # raises if the grammar does not accept it
    if which == "json":
        json.loads(text)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from(sorted(SAMPLED_GRAMMARS)), seed=st.integers(0, 2**16))
def test_sampled_text_parses_with_lark_earley(real_vocab, which, seed):
    text, ended = sample(compiled_for(which, real_vocab), torch.Generator().manual_seed(seed), 2048)
    if ended:
        check_sampled(which, text)


@pytest.mark.parametrize("which", sorted(SAMPLED_GRAMMARS))
def test_sampling_ends_often_enough_to_check(real_vocab, which):
    """The property test above checks only samples that end: most must, or it checked little."""
    ended = 0
    for seed in range(10):
        text, done = sample(compiled_for(which, real_vocab), torch.Generator().manual_seed(seed), 2048)
        if done:
            check_sampled(which, text)
            ended += 1
    assert ended >= 5, f"{ended} of 10 samples of {which!r} ended within 120 tokens"


# ----------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def engine(make_tiny_model):
    path = make_tiny_model("qwen2", vocab_size=512, seed=11)
    with LocalEngine(model_path=str(path), max_total_tokens=4096, debug_check_memory=True) as eng:
        yield eng


def test_engine_ebnf_and_lark_share_a_batch_and_a_bad_grammar_aborts_alone(engine):
    lark_grammar = 'start: "(" NUMBER ("," NUMBER)* ")"\nNUMBER: /[0-9]{1,3}/\n'
    free = {"temperature": 0, "max_new_tokens": 5, "ignore_eos": True}
    outs = engine.generate(
        ["List:", "Tuple:", "Free", "Bad", "Also free"],
        [
            {"ebnf": CHOICES_GBNF, "temperature": 1.0, "max_new_tokens": 40, "seed": 1},
            {"lark": lark_grammar, "temperature": 1.0, "max_new_tokens": 40, "seed": 2},
            free,
            {"ebnf": 'root ::= "x" | (', "max_new_tokens": 5},
            free,
        ],
    )
    reasons = [o["meta_info"]["finish_reason"] for o in outs]
    assert reasons[0]["type"] == "stop" and reasons[1]["type"] == "stop", reasons
    earley_oracle(CHOICES_GBNF).parse(outs[0]["text"])
    lark.Lark(lark_grammar, parser="earley", lexer="dynamic_complete").parse(outs[1]["text"])
    assert reasons[2] == reasons[4] == {"type": "length", "length": 5}
    assert reasons[3]["type"] == "abort" and "line 1" in reasons[3]["message"] and outs[3]["output_ids"] == []
    assert engine.scheduler.grammar_queue == [] and not engine.scheduler.has_work()

