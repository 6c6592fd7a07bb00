"""End-to-end JSON-schema decoding at batch 16: Loom constrained vs Loom unconstrained vs `outlines` + Transformers.

One SmolLM2-135M-shaped random model (CPU, fp32 by default), three JSON schemas (the extraction
schemas of `bench_jump_forward.py`: long forced keys, short bounded values), `--batch` prompts per
schema. Every system sees the same prompts, temperature 1.0 and the same `max_new_tokens`; no
`ignore_eos`: a request ends at EOS / the end of the grammar or at the budget, and the tokens
actually generated are counted (up to and including EOS). Systems:

- Loom unconstrained (no schema; on a random model it mostly runs to the budget),
- Loom constrained, `grammar_backend=outlines`, jump-forward off and on,
- `outlines` (1.3.3) with Transformers, the way its users write it:
  `outlines.Generator(outlines.from_transformers(model, tok), outlines.types.JsonSchema(schema))`
  built once per schema (compile time reported apart), then `generator.batch(prompts, ...)`;
  tokens are counted on the ids `model.generate` returned (up to the first EOS).

Each batch holds one schema (outlines' `batch` takes one output type). Warm-up runs (a short batch per
schema) are excluded. The systems stay loaded side by side and take turns, batch by batch (the order
alternating), so that a shared machine's changing load falls on all of them alike. Validity:
`json.loads` + `jsonschema` on every output.

    python benchmarks/bench_json_decode.py                         # batch 16, 3 schemas, 256 tokens
    python benchmarks/bench_json_decode.py --systems loom --batch 4  # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

from loom.demo_model import bench_model_path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_jump_forward import SCHEMAS  # noqa: E402 - the benchmark folder is not a package

SYSTEMS = ("loom", "outlines")


@dataclass
class Row:
    system: str
    seconds: float
    requests: int
    tokens: int
    valid: int
    compile_s: float = 0.0

    def cells(self, base: Row | None) -> list[str]:
        tps, rps = self.tokens / self.seconds, self.requests / self.seconds
        rel = "-" if base is None else f"{tps / (base.tokens / base.seconds):.2f}×"
        return [self.system, f"{rps:.2f}", f"{tps:.1f}", rel, f"{self.tokens / self.requests:.1f}",
                f"{self.valid}/{self.requests}", f"{self.seconds:.1f}"]  # fmt: skip


def prompts_for(schema_index: int, batch: int) -> list[str]:
    return [f"Record {schema_index * batch + i}. Extract the fields as JSON:\n" for i in range(batch)]


def is_valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


class LoomSystem:
    """One LocalEngine (unconstrained, or constrained with jump-forward off / on), kept open so that
    every system's batches can be interleaved."""

    def __init__(self, path: Path, batch: int, max_new: int, constrained: bool, jump_forward: bool) -> None:
        from loom.runtime.entrypoints.engine import LocalEngine

        name = "Loom unconstrained" if not constrained else f"Loom outlines, jump-forward {'on' if jump_forward else 'off'}"
        self.row, self.batch, self.max_new, self.constrained = Row(name, 0.0, 0, 0, 0), batch, max_new, constrained
        kw = dict(max_running_requests=batch, max_total_tokens=batch * (max_new + 64) * 2, device="cpu", dtype="float32")
        self.engine = LocalEngine(model_path=str(path), grammar_backend="outlines", disable_jump_forward=not jump_forward, **kw)

    def params(self, s: int, schema: dict, max_new: int) -> list[dict]:
        params = [{"temperature": 1.0, "seed": s * self.batch + i, "max_new_tokens": max_new} for i in range(self.batch)]
        return [{**p, "json_schema": json.dumps(schema)} for p in params] if self.constrained else params

    def warm_up(self, schemas: list[dict]) -> None:  # compile the schemas, touch every path and batch size
        for s, schema in enumerate(schemas):
            self.engine.generate(prompts_for(s, self.batch), self.params(s, schema, 16))
        self.engine.flush_cache()

    def run(self, s: int, schema: dict) -> None:
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts_for(s, self.batch), self.params(s, schema, self.max_new))
        self.row.seconds += time.perf_counter() - t0
        self.row.requests += len(outs)
        self.row.tokens += sum(len(o["output_ids"]) for o in outs)
        self.row.valid += sum(is_valid(o["text"], schema) for o in outs)
        self.engine.flush_cache()  # each repeat starts cold, as the first did

    def close(self) -> None:
        self.engine.shutdown()


class OutlinesSystem:
    """`outlines` with Transformers: one Generator per schema (compile time kept apart)."""

    def __init__(self, path: Path, batch: int, max_new: int) -> None:
        import outlines
        import torch

        from hf_reference import hf_model as load_hf_model
        from hf_reference import hf_tokenizer

        self.outlines, self.torch, self.batch, self.max_new = outlines, torch, batch, max_new
        hf_tok = hf_tokenizer(path)
        hf_model = load_hf_model(path, torch.float32)
        self.model = outlines.from_transformers(hf_model, hf_tok)
        eos = hf_model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.counted: list[int] = []
        inner = self.model._generate_output_seq

        def counting(prompts: Any, inputs: Any, **kw: Any) -> Any:  # the generated ids, to count real tokens
            ids = inner(prompts, inputs, **kw)  # [B, T], padded with pad_token_id after EOS
            for row in ids.tolist():
                self.counted.append(next((i + 1 for i, t in enumerate(row) if t in self.eos), len(row)))
            return ids

        self.model._generate_output_seq = counting
        self.row = Row("outlines 1.3.3 + Transformers", 0.0, 0, 0, 0)
        self.generators: dict[int, Any] = {}
        self.gen_kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0)

    def warm_up(self, schemas: list[dict]) -> None:
        for s, schema in enumerate(schemas):
            t0 = time.perf_counter()
            self.generators[s] = self.outlines.Generator(self.model, self.outlines.types.JsonSchema(json.dumps(schema)))
            self.row.compile_s += time.perf_counter() - t0
            self.generators[s].batch(prompts_for(s, self.batch), max_new_tokens=4, **self.gen_kw)

    def run(self, s: int, schema: dict) -> None:
        self.torch.manual_seed(s)
        self.counted.clear()
        t0 = time.perf_counter()
        texts = self.generators[s].batch(prompts_for(s, self.batch), max_new_tokens=self.max_new, **self.gen_kw)
        self.row.seconds += time.perf_counter() - t0
        self.row.requests += len(texts)
        self.row.valid += sum(is_valid(t, schema) for t in texts)
        self.row.tokens += sum(self.counted)

    def close(self) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="requests per schema, all in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--schemas", type=int, default=len(SCHEMAS), help="how many of the three schemas (one batch each)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over the schemas (each round interleaves the systems)")
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--model", type=Path, default=None, help="a .gguf file or Hugging Face folder (default: loom.demo_model.bench_model_path())")
    args = parser.parse_args(argv)
    path = args.model or bench_model_path()
    schemas = SCHEMAS[: args.schemas]
    systems: list[Any] = []
    if "loom" in args.systems:
        systems += [LoomSystem(path, args.batch, args.max_new_tokens, c, jf) for c, jf in ((False, True), (True, False), (True, True))]
    if "outlines" in args.systems:
        systems.append(OutlinesSystem(path, args.batch, args.max_new_tokens))
    for system in systems:
        system.warm_up(schemas)
    # Interleaved: each schema's batch runs on every system in turn (the order alternating), so that
    # the load of a shared machine falls on all of them alike.
    turn = 0
    for _ in range(args.repeats):
        for s, schema in enumerate(schemas):
            for system in systems if turn % 2 == 0 else systems[::-1]:
                system.run(s, schema)
            turn += 1
    for system in systems:
        system.close()
    rows = [system.row for system in systems]
    base = rows[0] if "loom" in args.systems else None
    print("| system | req/s | out tok/s | tok/s vs Loom unconstrained | tokens / request | valid | seconds |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r.cells(base)) + " |")
    loom_best = max((r for r in rows if r.system.startswith("Loom outlines")), key=lambda r: r.tokens / r.seconds, default=None)
    other = next((r for r in rows if r.system.startswith("outlines")), None)
    if loom_best and other:
        print(f"\nbest Loom constrained vs outlines + Transformers: {(loom_best.tokens / loom_best.seconds) / (other.tokens / other.seconds):.2f}× tok/s, "
              f"{(loom_best.requests / loom_best.seconds) / (other.requests / other.seconds):.2f}× req/s; "
              f"outlines compile ({len(schemas)} schemas, excluded): {other.compile_s:.1f} s")  # fmt: skip
    print(f"batch {args.batch} × {len(schemas)} schemas, max_new_tokens {args.max_new_tokens}, model {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
