"""Jump-forward on vs off, in one run: JSON-schema extraction on a SmolLM2-135M-shaped random model.

Each request fills one of three schemas with long fixed keys (what a grammar forces); the values
are short (bounded strings, enums, integers, booleans), so most of each output is forced. Both
engines see the same prompts, schemas and seeds; the table gives requests/s, decode steps (from
the scheduler's stats), output tokens/s and whether every output validates.

    python benchmarks/bench_jump_forward.py                  # 32 requests, batch up to 16
    python benchmarks/bench_jump_forward.py --requests 64 --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

from loom.demo_model import bench_model_path
from loom.runtime.entrypoints.engine import LocalEngine


def _object(props: dict[str, dict]) -> dict:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SHORT = {"type": "string", "maxLength": 8}
SCHEMAS = [
    _object({
        "customer_full_name": SHORT, "customer_email_address": SHORT, "shipping_street_address": SHORT,
        "shipping_postal_code": {"type": "integer", "minimum": 1000, "maximum": 99999},
        "requires_signature_on_delivery": {"type": "boolean"},
    }),
    _object({
        "invoice_reference_number": {"type": "integer", "minimum": 0, "maximum": 999999},
        "invoice_payment_status": {"enum": ["paid", "pending", "overdue"]},
        "invoice_currency_code": {"enum": ["EUR", "USD", "GBP"]},
        "line_item_descriptions": {"type": "array", "items": SHORT, "maxItems": 2},
    }),
    _object({
        "patient_identifier": SHORT, "attending_physician_name": SHORT,
        "admission_ward_name": {"enum": ["cardiology", "oncology", "neurology"]},
        "is_follow_up_appointment": {"type": "boolean"}, "number_of_prior_visits": {"type": "integer", "minimum": 0, "maximum": 50},
    }),
]  # fmt: skip


def workload(n: int) -> tuple[list[str], list[dict], list[dict]]:
    prompts, params, schemas = [], [], []
    for i in range(n):
        schema = SCHEMAS[i % len(SCHEMAS)]
        prompts.append(f"Record {i}. Extract the fields as JSON:\n")
        params.append({"json_schema": json.dumps(schema), "temperature": 1.0, "seed": i, "max_new_tokens": 256})
        schemas.append(schema)
    return prompts, params, schemas


def run(path: Path, jump_forward: bool, n: int, **engine_kw) -> dict:
    prompts, params, schemas = workload(n)
    with LocalEngine(model_path=str(path), disable_jump_forward=not jump_forward, **engine_kw) as engine:
        # Warm-up: compile every schema (cached per engine) and touch every code path once.
        engine.generate(prompts[: len(SCHEMAS)], [{**p, "max_new_tokens": 4} for p in params[: len(SCHEMAS)]])
        engine.flush_cache()
        before = dict(engine.scheduler.stats)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        stats = {k: v - before.get(k, 0) for k, v in engine.scheduler.stats.items()}
    valid = 0
    for out, schema in zip(outs, schemas):
        try:
            jsonschema.validate(json.loads(out["text"]), schema)
            valid += out["meta_info"]["finish_reason"]["type"] == "stop"
        except (ValueError, jsonschema.ValidationError):
            pass
    tokens = sum(len(o["output_ids"]) for o in outs)
    return {
        "mode": "jump-forward on" if jump_forward else "jump-forward off",
        "req/s": n / elapsed, "decode steps": stats["decode_steps"], "out tok/s": tokens / elapsed,
        "out tokens": tokens, "forced tokens": stats["jump_forward_tokens"], "valid": f"{valid}/{n}", "s": elapsed,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-running", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kv-tokens", type=int, default=32768)
    args = parser.parse_args()
    path = bench_model_path()
    kw = {"max_running_requests": args.max_running, "max_total_tokens": args.kv_tokens, "device": args.device}
    rows = [run(path, jf, args.requests, **kw) for jf in (False, True)]
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    off, on = rows
    print(f"\njump-forward: {on['req/s'] / off['req/s']:.2f}x requests/s, "
          f"{off['decode steps'] / max(on['decode steps'], 1):.2f}x fewer decode steps")  # fmt: skip


if __name__ == "__main__":
    main()
