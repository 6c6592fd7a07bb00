"""What a never-seen schema costs in the engine: first-token latency and batch throughput, per grammar backend.

Each backend gets its own `LocalEngine` on the same model (SmolLM2-135M-Instruct's GGUF when installed),
all loaded side by side and taking turns schema by schema (the order rotating), so a shared machine's
load falls on all alike. Before timing, each engine answers one unconstrained request and one
constrained request on a warm-up schema, so the backend's one-time set-up (tokenizer info,
vocabulary index) is excluded; that set-up time is reported apart.

- first token: 8 extraction / tool-call schemas, each sent once per round as a streamed request, a
  nonce in its `description` making it new to every backend's cache each round; the time to the
  first streamed chunk (compile + prefill + first masked token). Unconstrained requests with the
  same prompts give the floor.
- batch: 16 requests at once, each with its own never-seen schema, `--batch-tokens` tokens at most:
  requests and output tokens per second, and how many outputs validate.
- `--kind grammars`: the same for bench_ebnf_mask's GBNF / Lark grammars and regexes, each made new
  per request by one more alternative (a nonce literal, never generated: a new grammar whose other
  terminals the process may have built before, as a server meets variants of the same grammars;
  bench_ebnf_mask gives the compile with nothing built before), with the time per output token
  after the first (greedy, up to `--tokens`) beside the first token's. No batch run.

    python benchmarks/bench_grammar_first_token.py                         # loom, llguidance, xgrammar
    python benchmarks/bench_grammar_first_token.py --rounds 5 --backends loom llguidance
    python benchmarks/bench_grammar_first_token.py --kind grammars --backends loom llguidance
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
import uuid
from typing import Any

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "email": {"type": "string", "format": "email"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}, "population": {"type": "integer"},
                                      "coordinates": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                                                      "required": ["lat", "lon"]}}, "required": ["city", "country"]},
    {"type": "object", "properties": {"function": {"const": "get_weather"},
                                      "arguments": {"type": "object", "properties": {"location": {"type": "string"},
                                                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                                                    "required": ["location"]}}, "required": ["function", "arguments"]},
    {"type": "object", "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                                      "confidence": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["sentiment", "confidence"]},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 80},
                                      "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5}}, "required": ["title"]},
    {"type": "object", "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
                                      "items": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"},
                                                                                                           "qty": {"type": "integer", "minimum": 1}},
                                                                           "required": ["sku", "qty"]}},
                                      "total": {"type": "number"}}, "required": ["order_id", "items", "total"]},
    {"type": "object", "properties": {"event": {"type": "string"}, "start": {"type": "string", "format": "date-time"},
                                      "end": {"type": "string", "format": "date-time"},
                                      "attendees": {"type": "array", "items": {"type": "string", "format": "email"}},
                                      "priority": {"enum": ["low", "medium", "high", None]}}, "required": ["event", "start", "attendees"]},
    {"type": "object", "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                                      "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                                                      "limit": {"type": "integer", "minimum": 1, "maximum": 100},
                                                                                      "include_archived": {"type": "boolean"}},
                                                     "required": ["query"]}}, "required": ["name", "parameters"]},
]  # fmt: skip
WARMUP = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
PROMPT = "Extract the fields as JSON from: Ada Lovelace, 36, ada@example.com, London, 2025-01-01T10:00:00Z.\nJSON: "


def fresh(schema: dict[str, Any]) -> str:
    """The schema with a nonce in its description: new to every cache, the same grammar."""
    return json.dumps({**schema, "description": f"request {uuid.uuid4().hex}"})


def fresh_grammar(kind: str, source: str) -> str:
    """The grammar or regex with one more alternative at its start rule: a nonce literal, never generated."""
    nonce = uuid.uuid4().hex
    if kind == "regex":
        return f"(?:{source})|~{nonce}~"
    head = r"^(start\s*:|root\s*::=)(.*)$"
    return re.sub(head, lambda m: f'{m[1]} ({m[2]}) | "~{nonce}~"', source, count=1, flags=re.M)


def stream_times(engine: Any, params: dict[str, Any]) -> tuple[float, float | None]:
    """(seconds to the first streamed chunk, seconds per output token after it, or None with one token)."""
    t = time.perf_counter()
    stream = engine.generate(PROMPT, params, stream=True)
    first = next(stream)
    t_first = time.perf_counter()
    n_first, n = len(first["output_ids"]), len(first["output_ids"])
    for chunk in stream:
        n += len(chunk["output_ids"])
    t_end = time.perf_counter()
    return t_first - t, ((t_end - t_first) / (n - n_first) if n > n_first else None)


def first_token_s(engine: Any, params: dict[str, Any]) -> float:
    t = time.perf_counter()
    stream = engine.generate(PROMPT, params, stream=True)
    next(stream)
    elapsed = time.perf_counter() - t
    stream.close()  # aborts the rest
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a .gguf file or a model folder (default: loom.default_model's choice)")
    parser.add_argument("--backends", nargs="+", default=["loom", "llguidance", "xgrammar"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the 8 schemas (each round: new nonces)")
    parser.add_argument("--batch", type=int, default=16, help="requests in the batch run, each with its own schema (0: skip)")
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--batch-rounds", type=int, default=2)
    parser.add_argument(
        "--kind",
        choices=["schemas", "grammars"],
        default="schemas",
        help="new JSON schemas (and the batch run), or new GBNF / Lark grammars and regexes",
    )
    parser.add_argument("--tokens", type=int, default=48, help="--kind grammars: output tokens per request (greedy)")
    args = parser.parse_args(argv)

    import jsonschema

    from loom.default_model import choose_model
    from loom.runtime.entrypoints.engine import LocalEngine

    model = choose_model(args.model).path
    engines: dict[str, Any] = {}
    setup: dict[str, float] = {}
    for name in args.backends:
        engines[name] = LocalEngine(model_path=model, grammar_backend=name)
        engines[name].generate("Hi", {"max_new_tokens": 2, "temperature": 0})
        t = time.perf_counter()
        engines[name].generate(PROMPT, {"json_schema": json.dumps(WARMUP), "max_new_tokens": 8, "temperature": 0})
        setup[name] = time.perf_counter() - t
    if args.kind == "grammars":
        grammars_report(engines, setup, model, args)
        for engine in engines.values():
            engine.shutdown()
        return 0
    floor: list[float] = []
    firsts: dict[str, list[list[float]]] = {b: [[] for _ in SCHEMAS] for b in args.backends}
    for r in range(args.rounds):
        for k, schema in enumerate(SCHEMAS):
            order = args.backends[(r + k) % len(args.backends) :] + args.backends[: (r + k) % len(args.backends)]
            for name in order:
                firsts[name][k].append(first_token_s(engines[name], {"json_schema": fresh(schema), "max_new_tokens": 32, "temperature": 0}))
            floor.append(first_token_s(engines[args.backends[0]], {"max_new_tokens": 32, "temperature": 0}))
    print(f"model: {model}; {args.rounds} rounds; one-time backend set-up (first constrained request): "
          + ", ".join(f"{b} {setup[b] * 1e3:.0f} ms" for b in args.backends))  # fmt: skip
    print(f"unconstrained first token: median {statistics.median(floor) * 1e3:.0f} ms\n")
    ref = args.backends[1] if len(args.backends) > 1 else None
    print("| schema | " + " | ".join(f"{b} (ms)" for b in args.backends) + (f" | {args.backends[0]} / {ref} |" if ref else " |"))
    print("|---|" + "---|" * (len(args.backends) + (1 if ref else 0)))
    ratios = []
    for k in range(len(SCHEMAS)):
        med = {b: statistics.median(firsts[b][k]) for b in args.backends}
        cells = [f"{med[b] * 1e3:.0f}" for b in args.backends]
        if ref:
            ratios.append(med[args.backends[0]] / med[ref])
            cells.append(f"{ratios[-1]:.2f}x")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if ref:
        print(f"\n{args.backends[0]} / {ref}: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x")

    if args.batch:
        print(f"\nbatch: {args.batch} requests, each with its own new schema, up to {args.batch_tokens} tokens, temperature 1.0")
        print("| backend | req/s | out tok/s | valid | invalid (finished) | cut at the budget | seconds |\n|---|---|---|---|---|---|---|")
        totals = {b: [0.0, 0, 0, 0, 0] for b in args.backends}
        for r in range(args.batch_rounds):
            for name in args.backends if r % 2 == 0 else list(reversed(args.backends)):
                schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(args.batch)]
                sources = [fresh(s) for s in schemas]
                params = [
                    {"json_schema": src, "max_new_tokens": args.batch_tokens, "temperature": 1.0, "seed": i}
                    for i, src in enumerate(sources)
                ]
                t = time.perf_counter()
                outs = engines[name].generate([PROMPT] * args.batch, params)
                totals[name][0] += time.perf_counter() - t
                totals[name][1] += sum(len(o["output_ids"]) for o in outs)
                totals[name][2] += len(outs)
                for s, o in zip(schemas, outs):
                    if o["meta_info"]["finish_reason"]["type"] != "stop":
                        continue  # cut at the token budget: neither valid nor invalid
                    try:
                        jsonschema.validate(json.loads(o["text"]), s)
                        totals[name][3] += 1
                    except (ValueError, jsonschema.ValidationError):
                        totals[name][4] += 1
        for name, (secs, toks, n, ok, bad) in totals.items():
            print(f"| {name} | {n / secs:.2f} | {toks / secs:.1f} | {ok}/{n} | {bad} | {n - ok - bad} | {secs:.1f} |")
    for engine in engines.values():
        engine.shutdown()
    return 0


def grammars_report(engines: dict[str, Any], setup: dict[str, float], model: str, args: argparse.Namespace) -> None:
    """First token and time per output token with never-seen grammars and regexes, per backend."""
    from bench_ebnf_mask import CASES

    backends = list(engines)
    first = {b: [[] for _ in CASES] for b in backends}
    per_token = {b: [[] for _ in CASES] for b in backends}
    floor: list[tuple[float, float | None]] = []
    for r in range(args.rounds):
        for k, (_, kind, source) in enumerate(CASES):
            shift = (r + k) % len(backends)
            for name in backends[shift:] + backends[:shift]:
                ft, tpot = stream_times(engines[name], {kind: fresh_grammar(kind, source), "max_new_tokens": args.tokens, "temperature": 0})
                first[name][k].append(ft)
                if tpot is not None:
                    per_token[name][k].append(tpot)
            floor.append(stream_times(engines[backends[0]], {"max_new_tokens": args.tokens, "temperature": 0}))
    print(f"model: {model}; {args.rounds} rounds; one-time backend set-up (first constrained request): "
          + ", ".join(f"{b} {setup[b] * 1e3:.0f} ms" for b in backends))  # fmt: skip
    print("(nan per token: the answer was one token)")
    floor_tpot = [t for _, t in floor if t is not None]
    print(f"unconstrained: first token median {statistics.median(f for f, _ in floor) * 1e3:.0f} ms, "
          f"per output token {statistics.median(floor_tpot) * 1e3 if floor_tpot else float('nan'):.1f} ms\n")  # fmt: skip
    ref = backends[1] if len(backends) > 1 else None
    cols = [f"{b} first / per token (ms)" for b in backends] + ([f"{backends[0]} / {ref} first, per token"] if ref else [])
    print("| grammar | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    ratios: dict[str, list[float]] = {"first": [], "per token": []}
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    for k, (case, _, _) in enumerate(CASES):
        cells = [f"{med(first[b][k]) * 1e3:.0f} / {med(per_token[b][k]) * 1e3:.1f}" for b in backends]
        if ref:
            ratios["first"].append(med(first[backends[0]][k]) / med(first[ref][k]))
            ratios["per token"].append(med(per_token[backends[0]][k]) / med(per_token[ref][k]))
            cells.append(f"{ratios['first'][-1]:.2f}x, {ratios['per token'][-1]:.2f}x")
        print(f"| {case} | " + " | ".join(cells) + " |")
    if ref:
        for what, rs in ratios.items():
            rs = [x for x in rs if x == x]  # (a case answered in one token has no time per token)
            print(f"{backends[0]} / {ref}, {what}: median {statistics.median(rs):.2f}x, worst {max(rs):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
