"""Offline engine benchmarks, side by side in one run, on a SmolLM2-135M-shaped random model
(or on `--model`, a .gguf file or Hugging Face folder: Transformers then loads the same file).

1. few-shot: 64 programs share a 1,000-token prefix, each adds a 24-token question and
   generates 8 tokens. Loom (radix cache on) vs Loom (radix cache off) vs Transformers
   `generate`, one call per program (the way its users write it).
2. decode: tokens/s at batch 1 and 16 (128 new tokens), Loom vs Transformers `generate`.

    python benchmarks/bench_offline.py                 # everything (~10 min on 2 CPU cores)
    python benchmarks/bench_offline.py --only decode   # one part
    python benchmarks/bench_offline.py --model SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from loom.demo_model import bench_model_path
from loom.runtime.entrypoints.engine import LocalEngine

from hf_reference import hf_model  # benchmarks/hf_reference.py


def fewshot_workload(programs: int, prefix_len: int, question_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prefix = [rng.randrange(10, vocab) for _ in range(prefix_len)]
    return [prefix + [rng.randrange(10, vocab) for _ in range(question_len)] for _ in range(programs)]


def run_loom(path: Path, prompts: list[list[int]], new_tokens: int, **engine_kw) -> tuple[float, list[list[int]], dict]:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with LocalEngine(model_path=str(path), **engine_kw) as engine:
        engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2})  # warm-up
        engine.flush_cache()
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
        stats = dict(engine.get_server_info()["stats"])
    return elapsed, [o["output_ids"] for o in outs], stats


@torch.inference_mode()
def run_hf_per_program(model, prompts: list[list[int]], new_tokens: int) -> tuple[float, list[list[int]]]:
    outs = []
    t0 = time.perf_counter()
    for p in tqdm(prompts, desc="transformers, one generate() per program", leave=False):
        ids = torch.tensor([p])
        gen = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=False, pad_token_id=0,
        )
        outs.append(gen[0, len(p) :].tolist())
    return time.perf_counter() - t0, outs


def bench_fewshot(args, path: Path, hf) -> list[tuple]:
    prompts = fewshot_workload(args.programs, args.prefix_len, args.question_len, 40000)
    rows = []
    print(f"few-shot: {len(prompts)} programs, {args.prefix_len}-token shared prefix, "
          f"{args.question_len}-token question, {args.new_tokens} new tokens", file=sys.stderr)
    t_on, out_on, stats = run_loom(path, prompts, args.new_tokens, max_total_tokens=args.kv_tokens)
    rows.append(("Loom, radix cache on", t_on, stats["cached_tokens"]))
    t_off, out_off, _ = run_loom(path, prompts, args.new_tokens, max_total_tokens=args.kv_tokens, disable_radix_cache=True)
    rows.append(("Loom, radix cache off", t_off, 0))
    hf_prompts = prompts[: args.hf_programs]
    t_hf, out_hf = run_hf_per_program(hf, hf_prompts, args.new_tokens)
    scale = len(prompts) / len(hf_prompts)
    label = "Transformers generate, per program" + ("" if scale == 1 else f" ({len(hf_prompts)} run, x{scale:.0f})")
    rows.append((label, t_hf * scale, 0))
    same = sum(a == b for a, b in zip(out_on, out_hf))
    print(f"greedy outputs equal to Transformers: {same}/{len(out_hf)}; radix on == off: {out_on == out_off}", file=sys.stderr)
    total_tokens = len(prompts) * (args.prefix_len + args.question_len + args.new_tokens)
    print(f"\n## Few-shot workload ({len(prompts)} programs)\n")
    print("| system | time (s) | programs/s | prompt tokens from cache | speed-up vs Transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, t, cached in rows:
        print(f"| {name} | {t:.2f} | {len(prompts) / t:.2f} | {cached} | {rows[-1][1] / t:.1f}x |")
    print(f"\n(Loom radix on vs off: {t_off / t_on:.1f}x; {total_tokens} tokens per run)")
    return rows


@torch.inference_mode()
def hf_decode_tps(model, batch: int, prompt_len: int, new_tokens: int) -> float:
    ids = torch.randint(10, 40000, (batch, prompt_len))
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)  # warm-up
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    return batch * (new_tokens - 1) / (time.perf_counter() - t0 - prefill)


def loom_decode_tps(engine, batch: int, prompt_len: int, new_tokens: int) -> float:
    prompts = [[random.randrange(10, 40000) for _ in range(prompt_len)] for _ in range(batch)]
    one = {"temperature": 0, "max_new_tokens": 1, "ignore_eos": True}
    engine.flush_cache()
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params=one)
    prefill = time.perf_counter() - t0
    engine.flush_cache()
    t0 = time.perf_counter()
    engine.generate(input_ids=prompts, sampling_params={**one, "max_new_tokens": new_tokens})
    return batch * (new_tokens - 1) / (time.perf_counter() - t0 - prefill)


def bench_decode(args, path: Path, hf) -> None:
    print("\n## Decode throughput (tokens/s, 128 new tokens after a 32-token prompt)\n")
    print("| batch | Loom | Transformers | Loom / Transformers |")
    print("|---:|---:|---:|---:|")
    with LocalEngine(model_path=str(path), max_total_tokens=args.kv_tokens) as engine:
        loom_decode_tps(engine, 1, 8, 4)  # warm-up
        for batch in args.batches:
            ours = loom_decode_tps(engine, batch, 32, args.decode_tokens)
            theirs = hf_decode_tps(hf, batch, 32, args.decode_tokens)
            print(f"| {batch} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["fewshot", "decode"], help="run one part")
    parser.add_argument("--programs", type=int, default=64)
    parser.add_argument("--prefix-len", type=int, default=1000)
    parser.add_argument("--question-len", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--hf-programs", type=int, default=64, help="programs Transformers runs (time scaled to --programs)")
    parser.add_argument("--kv-tokens", type=int, default=80000)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--model", help="a .gguf file or Hugging Face folder (default: the SmolLM2-135M-shaped random model)")
    args = parser.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    path = Path(args.model) if args.model else bench_model_path()
    hf = hf_model(path)
    print(f"torch threads: {torch.get_num_threads()}, model: {path}", file=sys.stderr)
    if args.only in (None, "fewshot"):
        bench_fewshot(args, path, hf)
    if args.only in (None, "decode"):
        bench_decode(args, path, hf)


if __name__ == "__main__":
    main()
