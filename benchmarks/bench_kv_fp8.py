"""What an fp8 (e4m3) KV cache costs in accuracy and saves in memory, side by side with the
full-precision cache on the same weights, in one run.

For each cache: KV bytes per token, greedy continuations of `--prompts` prompts (how many tokens
agree with the full-precision run before they part), teacher-forced scoring of the
full-precision continuations (mean and max |delta logprob| per token, top-1 agreement), and
decode throughput. A third column rounds K and V through bfloat16 instead (simulated, in an
fp32 cache) as a yardstick: a deep random-weight network (the default, SmolLM2-135M-shaped) is
chaotic, so even that small rounding moves its peaked logits; point `--model` at a real
checkpoint for figures that transfer.

    python benchmarks/bench_kv_fp8.py                 # demo model, ~1 min on 2 CPU cores
    python benchmarks/bench_kv_fp8.py --model PATH --prompts 32 --new-tokens 64

Nothing here asserts a time or an accuracy: the figures are for reading.
"""

from __future__ import annotations

import argparse
import sys
import time

from tqdm import tqdm

from loom.runtime.entrypoints.engine import LocalEngine

TOPICS = ["the weather", "a long journey", "the history of bread", "how engines work", "a small village",
          "the ocean at night", "learning to paint", "an old library"]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: a SmolLM2-135M-shaped random model)")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--new-tokens", type=int, default=48, help="greedy tokens per prompt")
    p.add_argument("--max-total-tokens", type=int, default=8192, help="KV cache slots for each engine")
    return p.parse_args(argv)


def run(model: str, kv: str, prompts: list[str], args: argparse.Namespace, reference: list[list[int]] | None) -> dict:
    params = {"temperature": 0, "max_new_tokens": args.new_tokens, "ignore_eos": True}
    with LocalEngine(model_path=model, max_total_tokens=args.max_total_tokens,
                     kv_cache_dtype="auto" if kv == "bf16-sim" else kv) as engine:  # fmt: skip
        pool = engine.model_runner.token_to_kv_pool
        if kv == "bf16-sim":
            store = pool.set_kv_buffer
            pool.set_kv_buffer = lambda layer, loc, k, v: store(layer, loc, *(x.bfloat16().to(x.dtype) for x in (k, v)))
        engine.generate(prompts[0], {"max_new_tokens": 2})  # warm-up (and, for fp8, the scales)
        engine.flush_cache()
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        ids = [o["output_ids"] for o in outs]
        seqs = [engine.tokenizer.encode(p) + r for p, r in zip(prompts, reference or ids)]
        engine.flush_cache()
        scored = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                                 logprob_start_len=0, top_logprobs_num=1)  # fmt: skip
        return {
            "ids": ids,
            "logprobs": [[x[0] for x in s["meta_info"]["input_token_logprobs"][1:]] for s in scored],
            "top1": [[t[0][1] for t in s["meta_info"]["input_top_logprobs"][1:]] for s in scored],
            "bytes_per_token": pool.mem_bytes() // (pool.size + 1),
            "decode_tok_s": sum(len(i) for i in ids) / seconds,
        }


def agree_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from loom.demo_model import bench_model_path

        model = str(bench_model_path())
    else:
        model = args.model
    prompts = [f"Write a few sentences about {TOPICS[i % len(TOPICS)]} (#{i})." for i in range(args.prompts)]
    results = {}
    for kv in tqdm(["auto", "fp8_e4m3", "bf16-sim"], desc="engines", file=sys.stderr):
        results[kv] = run(model, kv, prompts, args, results["auto"]["ids"] if results else None)
    ref = results["auto"]
    rows: dict[str, list[str]] = {}
    for kv in ("fp8_e4m3", "bf16-sim"):
        r = results[kv]
        deltas = [abs(a - b) for ra, rb in zip(ref["logprobs"], r["logprobs"]) for a, b in zip(ra, rb)]
        top1 = [a == b for ra, rb in zip(ref["top1"], r["top1"]) for a, b in zip(ra, rb)]
        agree = [agree_prefix(a, b) for a, b in zip(ref["ids"], r["ids"])]
        rows.setdefault("KV bytes per token", [str(ref["bytes_per_token"])]).append(
            str(r["bytes_per_token"]) if kv != "bf16-sim" else "(simulated)")
        rows.setdefault(f"decode throughput (tok/s, batch {args.prompts})", [f"{ref['decode_tok_s']:.1f}"]).append(
            f"{r['decode_tok_s']:.1f}")
        rows.setdefault("mean / max abs delta logprob (teacher-forced)", ["0"]).append(
            f"{sum(deltas) / len(deltas):.4f} / {max(deltas):.3f}")
        rows.setdefault("top-1 token agreement (teacher-forced)", ["1"]).append(f"{sum(top1) / len(top1):.4f}")
        rows.setdefault(f"greedy tokens equal before the first difference (mean of {args.new_tokens})",
                        [str(args.new_tokens)]).append(f"{sum(agree) / len(agree):.1f}")  # fmt: skip
    print(f"\n## fp8 KV cache vs full precision\n\n{args.prompts} prompts, {args.new_tokens} greedy tokens each; model {model}\n")
    print("| metric | full precision | fp8 e4m3 | bf16-rounded KV (yardstick) |")
    print("|---|---:|---:|---:|")
    for label, cells in rows.items():
        print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
