"""Per-step mask time of EBNF / Lark grammars and regexes on a ~49k-token vocabulary, per grammar backend.

    python benchmarks/bench_ebnf_mask.py [--vocab-size 49152] [--runs 20] [--steps 200] [--backends loom llguidance xgrammar] [--grammars regex]
    python benchmarks/bench_ebnf_mask.py --nest 30 [--vocab-size 131072]

Each run samples a document token by token under the mask (uniformly among allowed tokens,
preferring short ones so that strings close and documents end), timing every `fill_mask`.
"cold" is the first run on a fresh compiled grammar (every state new); "warm" are the runs after,
sharing the compiled grammar as requests of a server do. Compilation (with its warm-up of the
first mask, and for the first grammar the vocabulary's token trie, built once per vocabulary) is
timed apart. Every backend compiles the same source (`GrammarBackend`, as the server does) and
walks with the same random seed; a backend's one-time set-up (its tokenizer index) is taken
before any timing.

--nest N instead walks N levels into nested text (an arithmetic expression: `1 + (` per level; a
JSON value: `{"a": [` per level) on a fresh grammar, after an untimed walk on another (the
process's scans and automata built), timing each mask: every level's positions are new stacks. Loom runs with its masks taken at a stack's top frames (ebnf_tops, the
default) and without (every stack whole), beside llguidance.
"""

from __future__ import annotations

import argparse
import gc
import random
import time

import numpy as np

from loom.runtime.constrained import TokenVocab, allocate_token_bitmask, unpack_bitmask
from loom.runtime.constrained.vocabulary import byte_decoder
from loom.tiny_tokenizer import tiny_tokenizer

# Regexes a user sends for a field: an e-mail address, an RFC 3339 time, a quoted bounded text.
EMAIL_REGEX = r"[a-zA-Z0-9._%+-]{1,64}@[a-zA-Z0-9-]{1,63}(\.[a-zA-Z0-9-]{1,63}){1,4}"
DATE_TIME_REGEX = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})"
QUOTED_REGEX = r'"[^"\\\n]{0,200}"'
JSON_GBNF = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
ws ::= | " " | "\n" [ \t]{0,20}
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
ARITH_GBNF = r"""
root ::= expr
expr ::= term (ws [-+] ws term)*
term ::= factor (ws [*/] ws factor)*
factor ::= [0-9]+ ("." [0-9]+)? | "(" ws expr ws ")" | "-" factor
ws ::= " "?
"""

CASES = [("json gbnf", "ebnf", JSON_GBNF), ("json lark", "lark", JSON_LARK), ("arith gbnf", "ebnf", ARITH_GBNF),
         ("email regex", "regex", EMAIL_REGEX), ("date-time regex", "regex", DATE_TIME_REGEX), ("quoted regex", "regex", QUOTED_REGEX)]  # fmt: skip


def demo_vocab(vocab_size: int) -> tuple[dict[int, bytes], TokenVocab]:
    """The demo byte-level BPE tokenizer's token bytes (specials 0-2 left out) and its TokenVocab (EOS 0)."""
    tok = tiny_tokenizer(vocab_size)
    dec = byte_decoder()
    tb = {i: bytes(dec[c] for c in s) for s, i in tok.get_vocab().items() if i >= 3}
    return tb, TokenVocab.build(tb, vocab_size, frozenset({0}))


def walk(step, accept, vocab: TokenVocab, rnd: random.Random, steps: int) -> list[float]:
    """`step(row)` fills the mask at the current state; `accept(token)` moves on. -> fill times (s)."""
    row = allocate_token_bitmask(1, vocab.vocab_size)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(row[0])
        times.append(time.perf_counter() - t0)
        allowed = unpack_bitmask(row, vocab.vocab_size)[0].nonzero().view(-1).tolist()
        if any(t in vocab.eos_token_ids for t in allowed) and rnd.random() < 0.3:
            break
        short = [t for t in allowed if t in vocab.by_id and len(vocab.by_id[t]) <= 2]
        pool = short if short and rnd.random() < 0.8 else [t for t in allowed if t in vocab.by_id]
        if not pool:
            break
        accept(rnd.choice(pool))
    return times


def run(compiled, vocab: TokenVocab, rnd: random.Random, steps: int) -> list[float]:
    g = compiled.matcher()

    def accept(t: int) -> None:
        assert g.accept_token(t)

    return walk(g.fill_mask, accept, vocab, rnd, steps)


NESTS = [("arith gbnf", ARITH_GBNF, [b"1", b" +", b" ("]), ("json gbnf", JSON_GBNF, [b'{"', b"a", b'":', b" ["])]


def nest_report(backends: dict, vocab: TokenVocab, levels: int) -> None:
    """--nest: mask times along a walk `levels` deep, per backend (Loom with and without stand-ins)."""
    from loom.runtime.constrained import ebnf_tops

    ids = {b: t for t, b in vocab.by_id.items()}

    def tokens(text: bytes) -> list[int]:  # longest match first (a piece may not be one token of a small vocabulary)
        out = []
        while text:
            n = max(k for k in range(1, len(text) + 1) if text[:k] in ids)
            out.append(ids[text[:n]])
            text = text[n:]
        return out

    print(f"{'grammar':<12} {'backend':<24} {'first 10 levels: mean':>22} {'max':>6} {'levels after: mean':>19} {'max':>6}")
    for name, source, level in NESTS:
        runs = [(b, b, ebnf_tops.FRAMES) for b in backends]
        if "loom" in backends:
            runs.insert(1, ("loom", "loom, whole stacks", ()))
        for backend, label, frames in runs:
            saved, ebnf_tops.FRAMES = ebnf_tops.FRAMES, frames
            try:
                walk = [t for piece in level for t in tokens(piece)]
                for _ in range(2):  # (the first walk untimed: the process's scans and automata built)
                    g = backends[backend]._compile("ebnf", source).matcher()
                    row = allocate_token_bitmask(1, vocab.vocab_size)
                    times = []
                    for _ in range(levels):
                        for token in walk:
                            t0 = time.perf_counter()
                            g.fill_mask(row[0])
                            times.append(time.perf_counter() - t0)
                            assert g.accept_token(token), (name, backend, vocab.by_id[token])
            finally:
                ebnf_tops.FRAMES = saved
            t = np.array(times) * 1e3
            head, tail = t[: 10 * len(walk)], t[10 * len(walk) :]
            print(
                f"{name:<12} {label:<24} {head.mean():>22.3f} {head.max():>6.2f} {tail.mean() if len(tail) else 0:>19.3f} {tail.max() if len(tail) else 0:>6.2f}"
            )
    print("times in ms per fill_mask")


def main() -> None:
    from loom.runtime.constrained import GrammarBackend, GrammarError

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-size", type=int, default=49152)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--backends", nargs="+", default=["loom", "llguidance", "xgrammar"], choices=["loom", "llguidance", "xgrammar"])
    ap.add_argument("--grammars", nargs="+", default=None, help="only the cases whose name holds one of these words (e.g. regex, lark)")
    ap.add_argument("--nest", type=int, default=0, help="walk this many levels into nested text instead (see above)")
    args = ap.parse_args()
    tb, vocab = demo_vocab(args.vocab_size)
    print(f"vocabulary: {len(vocab.ids)} tokens (vocab_size {args.vocab_size})")
    backends = {}
    for name in args.backends:
        backends[name] = GrammarBackend(tb, args.vocab_size, vocab.eos_token_ids, grammar_backend=name, max_workers=1)
        backends[name]._token_vocab() if name == "loom" else backends[name]._native_compiler()  # (set-up kept out of the times)
    gc.collect()
    gc.freeze()  # as the scheduler process does once started (a full collection walked the tokenizer's training: 40-80 ms)
    if args.nest:
        return nest_report(backends, vocab, args.nest)
    print(
        f"{'grammar':<16} {'backend':<11} {'compile ms':>10} {'cold p50':>9} {'cold p99':>9} {'warm p50':>9} {'warm p99':>9}"
        f" {'warm max':>9} {'masks':>6}"
    )
    for name, kind, source in CASES:
        if args.grammars and not any(word in name for word in args.grammars):
            continue
        for backend, grammars in backends.items():
            t0 = time.perf_counter()
            try:
                compiled = grammars._compile(kind, source)
            except GrammarError as e:
                print(f"{name:<16} {backend:<11} refused: {str(e).splitlines()[-1][-90:]}")
                continue
            compile_ms = (time.perf_counter() - t0) * 1e3
            rnd = random.Random(0)
            cold = np.array(run(compiled, vocab, rnd, args.steps)) * 1e3
            warm = np.array([t for _ in range(args.runs) for t in run(compiled, vocab, rnd, args.steps)]) * 1e3
            p = lambda a, q: np.percentile(a, q)  # noqa: E731
            print(
                f"{name:<16} {backend:<11} {compile_ms:>10.1f} {p(cold, 50):>9.3f} {p(cold, 99):>9.2f} {p(warm, 50):>9.3f}"
                f" {p(warm, 99):>9.2f} {warm.max():>9.1f} {len(warm):>6}"
            )
    print("times in ms per fill_mask")


if __name__ == "__main__":
    main()
