"""The `loom` command line: `loom demo` (and, with the serving issue, `loom serve`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time


def _demo(args: argparse.Namespace) -> int:
    import loom
    from loom.demo_model import demo_model_path

    model = args.model or os.environ.get("LOOM_MODEL")
    if model:
        print(f"model: {model}")
    else:
        print("model: none given (--model / LOOM_MODEL), so building the built-in demo model:")
        print("       a tiny Llama with RANDOM WEIGHTS. Its text is gibberish; the engine underneath is real.")
        model = str(demo_model_path())
        print(f"       saved in the Hugging Face layout at {model}")

    t0 = time.perf_counter()
    engine = loom.Engine(model_path=model, dtype=args.dtype, max_total_tokens=args.max_total_tokens)
    print(f"engine ready in {time.perf_counter() - t0:.1f}s ({engine.model_runner.dtype}, {engine.model_runner.device})")

    # A few-shot prompt shared by every question: the radix cache computes it once.
    shots = "".join(f"Q: What is {a} plus {b}?\nA: {a + b}\n\n" for a, b in [(2, 3), (10, 7), (21, 21), (5, 8)])
    questions = [f"Q: What is {a} plus {b}?\nA:" for a, b in [(1, 1), (3, 4), (12, 30), (9, 9), (100, 1), (7, 6)]]
    params = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "stop": ["\n"]}
    t0 = time.perf_counter()
    outs = engine.generate([shots + q for q in questions], params)
    elapsed = time.perf_counter() - t0
    print(f"\n{len(questions)} few-shot questions in {elapsed:.2f}s (one batch, shared prefix cached once)\n")
    print(f"{'question':<28} {'answer':<34} {'prompt':>6} {'cached':>6} {'new':>4}")
    for q, out in zip(questions, outs):
        meta = out["meta_info"]
        question = q.splitlines()[0][3:]
        answer = out["text"].strip().replace("\n", " ")[:32]
        print(f"{question:<28} {answer!r:<34} {meta['prompt_tokens']:>6} {meta['cached_tokens']:>6} {meta['completion_tokens']:>4}")

    chat = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello in three languages."}], add_generation_prompt=True, tokenize=False
    )
    print("\nchat (streamed):", end=" ", flush=True)
    for chunk in engine.generate(chat, {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 24, "seed": 1}, stream=True):
        print(chunk["text"], end="", flush=True)
    print()
    info = engine.get_server_info()
    print(f"\ncache: {info['stats']['cached_tokens']} of {info['stats']['prompt_tokens']} prompt tokens came from the radix cache")
    engine.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loom",
        description="Loom: a structured-generation runtime (radix-cached KV, continuous batching, constrained decoding).",
    )
    parser.add_argument("--log-level", default="warning", help="logging level (debug, info, warning, error)")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="run a small demo program (builds a tiny random-weight model when no --model is given)",
        description="Run a few-shot batch and a streamed chat turn through loom.Engine and show what the cache did.",
    )
    demo.add_argument("--model", help="a Hugging Face model folder (default: $LOOM_MODEL, else the built-in demo model)")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="weight dtype")
    demo.add_argument("--max-total-tokens", type=int, default=None, help="KV cache slots (default: from memory)")
    demo.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate per question")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
