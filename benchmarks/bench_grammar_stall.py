"""How much a slow grammar compilation slows the other requests (issue 19).

The engine (`LocalEngine`, the scheduler in this thread) serves small unconstrained requests one
after another; meanwhile a grammar compiles on the backend's thread. Reported: the small
requests' latency p50 / max with no compilation, during a slow but admissible one, and around a
refused one (a 58-byte schema asking for 400,000 characters), plus how long the refusal took.

    python benchmarks/bench_grammar_stall.py                   # SmolLM2 when installed, else the demo model
    python benchmarks/bench_grammar_stall.py --model path.gguf --requests 20
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

HOSTILE = json.dumps({"type": "string", "minLength": 200000, "maxLength": 400000})
# ~0.7 s of compile in Python, most of it the LALR tables of its 600 rules (a regex no longer serves:
# its DFA is built as masks reach its states, so `(a|b)*a(a|b){13}`, used before, compiles in
# milliseconds; nor do 150 rules since the tables are built by lalr.py rather than Lark)
SLOW = "\n".join(["root ::= r0", *(f'r{i} ::= "k{i}" r{i + 1} | "j{i}" r{i * 7 % 600} ("," r{i * 3 % 600})* | "z"' for i in range(600)), 'r600 ::= "end"'])


def small_latencies(engine, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        engine.generate(f"Count {i}:", {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a model folder (default: loom.default_model's choice)")
    parser.add_argument("--requests", type=int, default=12)
    args = parser.parse_args(argv)
    from loom.default_model import choose_model
    from loom.runtime.entrypoints.engine import LocalEngine

    model = choose_model(args.model).path
    with LocalEngine(model_path=str(model)) as engine:
        small_latencies(engine, 2)  # warm-up
        backend = engine.scheduler.get_grammar_backend()
        backend.compile("regex", "[0-9]").result(timeout=120)  # the vocabulary is built once, not timed here
        quiet = small_latencies(engine, args.requests)
        t = time.perf_counter()
        slow = backend.compile("ebnf", SLOW)
        during = small_latencies(engine, args.requests)
        still_compiling = not slow.done()
        slow.exception(timeout=60)
        slow_s = time.perf_counter() - t
        t = time.perf_counter()
        out = engine.generate("x", {"json_schema": HOSTILE, "max_new_tokens": 4})
        refused_s = time.perf_counter() - t
        reason = out["meta_info"]["finish_reason"]
    fmt = lambda xs: f"p50 {statistics.median(xs) * 1e3:.0f} ms, max {max(xs) * 1e3:.0f} ms"  # noqa: E731
    print(f"model: {model}")
    print(f"small requests (4 tokens), no compilation:    {fmt(quiet)}")
    print(f"small requests during a {slow_s:.1f} s compilation{' (still running after them)' if still_compiling else ''}: {fmt(during)}")
    print(f"hostile schema answered in {refused_s * 1e3:.0f} ms: {reason.get('status_code')} {reason.get('message')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
