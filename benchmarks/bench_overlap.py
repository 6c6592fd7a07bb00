"""Overlap scheduling on vs off: decode tokens/s of one engine configuration, alternating runs.

    python benchmarks/bench_overlap.py                          # tiny model (scheduler-bound)
    python benchmarks/bench_overlap.py --hidden 576 --layers 30 # SmolLM2-135M-shaped (compute-bound)

Each repetition runs the same greedy batch (ignore_eos, so every run generates the same number of
tokens) once with overlap on and once off, in alternating order; the medians are reported, and
the outputs of the two modes are checked to be identical.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.runtime.entrypoints.engine import LocalEngine


def run(path: Path, overlap: bool, prompts: list[list[int]], new_tokens: int, device: str) -> tuple[float, list]:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with LocalEngine(model_path=str(path), device=device, disable_overlap_schedule=not overlap) as engine:
        engine.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 4})  # warm-up
        t0 = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        elapsed = time.perf_counter() - t0
    return len(prompts) * new_tokens / elapsed, [o["output_ids"] for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    heads = max(args.hidden // 64, 1)
    path = build_tiny_checkpoint(
        Path(tempfile.mkdtemp()), arch="llama", vocab_size=args.vocab, hidden_size=args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        intermediate_size=args.hidden * 3, seed=0,
    )  # fmt: skip
    rng = random.Random(0)
    prompts = [[rng.randrange(10, args.vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    rates: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list] = {}
    for rep in range(args.reps):
        for overlap in (True, False) if rep % 2 == 0 else (False, True):
            rate, outputs[overlap] = run(path, overlap, prompts, args.new_tokens, args.device)
            rates[overlap].append(rate)
    assert outputs[True] == outputs[False], "overlap on and off generated different tokens"
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"model hidden {args.hidden} x {args.layers} layers, batch {args.batch}, {args.new_tokens} new tokens, "
          f"{args.reps} reps")  # fmt: skip
    print(f"overlap on : {on:8.1f} tok/s  (runs: {', '.join(f'{r:.0f}' for r in rates[True])})")
    print(f"overlap off: {off:8.1f} tok/s  (runs: {', '.join(f'{r:.0f}' for r in rates[False])})")
    print(f"speed-up   : {on / off:.2f}x")


if __name__ == "__main__":
    main()
