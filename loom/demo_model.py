"""The models Loom builds for itself, cached under the cache dir (`loom/cache_dir.py`): the demo
model that `loom demo` runs when given no model (a small random-weight Llama), rebuilt when its
recipe here changes or a build was cut short, and the SmolLM2-135M-shaped random model the
benchmarks share. `python -m loom.demo_model` prints the demo model's folder, or writes any tiny
checkpoint (`loom/checkpoint_writer.py`) into a folder it is given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Any

from loom.cache_dir import cache_dir
from loom.checkpoint_writer import ARCHS, DTYPES, build_tiny_checkpoint, write_json

_DEMO_RECIPE = 1  # bump when the demo model's shape changes
_DEMO_SHAPE: dict[str, Any] = dict(
    arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, seed=0,
)  # fmt: skip


def smollm2_135m_shape(path: str | os.PathLike, **overrides: Any) -> pathlib.Path:
    """A random-weight checkpoint shaped like SmolLM2-135M (Llama, tied embeddings), for benchmarks."""
    shape: dict[str, Any] = dict(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_theta=100000.0, rms_norm_eps=1e-5,
    )  # fmt: skip
    shape.update(overrides)
    return build_tiny_checkpoint(path, **shape)


def bench_model_path() -> pathlib.Path:
    """The SmolLM2-135M-shaped random model the benchmarks share, built once under the cache dir."""
    root = cache_dir() / "bench-smollm2-135m"
    if not (root / "config.json").exists() or not any(root.glob("*.safetensors")):
        print(f"building a SmolLM2-135M-shaped random model in {root} ...", file=sys.stderr)
        smollm2_135m_shape(root)
    return root


_DEMO_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _demo_is_complete(path: pathlib.Path, spec: dict[str, Any]) -> bool:
    """True when `path` holds every file of a finished build of this recipe."""
    try:
        marker = json.loads((path / ".loom-demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return marker == spec and all((path / name).is_file() for name in _DEMO_FILES)


def demo_model_path() -> pathlib.Path:
    """The built-in demo model (a small random-weight Llama), built once under the cache dir.

    Rebuilt when the folder is missing, incomplete (an interrupted build) or from an older recipe.
    The build happens in a temp folder renamed into place, so concurrent callers are safe.
    """
    path = cache_dir() / "demo-model"
    spec = {"recipe": _DEMO_RECIPE, **_DEMO_SHAPE}
    if _demo_is_complete(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(dir=path.parent, prefix=".demo-model-build-"))
    try:
        build_tiny_checkpoint(tmp, **_DEMO_SHAPE)
        write_json(tmp / ".loom-demo.json", spec)
        if path.exists() and not _demo_is_complete(path, spec):
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first
            if not _demo_is_complete(path, spec):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """`python -m loom.demo_model PATH [--arch qwen3] ...`: build a checkpoint and print its path."""
    parser = argparse.ArgumentParser(
        prog="python -m loom.demo_model",
        description="Build a tiny random-weight checkpoint in the Hugging Face layout and print its folder.",
    )
    parser.add_argument("path", nargs="?", help="output folder (default: the cached demo model)")
    parser.add_argument("--arch", choices=ARCHS, help="architecture (default: llama)")
    parser.add_argument("--smollm2-135m", action="store_true", help="SmolLM2-135M's shape (other flags override it)")
    for flag, kind in [
        ("vocab-size", int), ("hidden-size", int), ("intermediate-size", int), ("num-hidden-layers", int),
        ("num-attention-heads", int), ("num-key-value-heads", int), ("head-dim", int), ("max-position-embeddings", int),
        ("num-shards", int), ("seed", int), ("init-std", float), ("tokenizer-vocab-size", int), ("rope-theta", float),
    ]:  # fmt: skip
        parser.add_argument(f"--{flag}", type=kind)
    parser.add_argument("--dtype", choices=DTYPES)
    parser.add_argument("--tie-word-embeddings", action="store_true", default=None)
    args = parser.parse_args(argv)
    if args.path is None:
        print(demo_model_path())
        return 0
    kwargs = {k: v for k, v in vars(args).items() if k not in ("path", "smollm2_135m") and v is not None}
    build = smollm2_135m_shape if args.smollm2_135m else build_tiny_checkpoint
    print(build(args.path, **kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
