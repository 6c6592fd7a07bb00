"""Tiny random-weight checkpoints in the Hugging Face layout, for tests and the demo.

A folder built here looks like one downloaded from the hub: `config.json`,
`generation_config.json`, `model.safetensors` (or `model-0000i-of-0000N.safetensors` plus
`model.safetensors.index.json`), `tokenizer.json`, `tokenizer_config.json` (with a ChatML
`chat_template`) and `special_tokens_map.json`. Loom and Transformers both load it through
their ordinary paths, so tests can compare the two on the same weights.

Weights are random but larger than Hugging Face's default (std 0.02), so the logits are
peaky: greedy tokens rarely hinge on a near-tie that float noise could flip.

The tokenizer is a byte-level BPE trained locally (no hub access) on English text built in
code plus the Python standard library's own source; trained tokenizers are cached per
vocabulary size under `$LOOM_CACHE` (default `~/.cache/loom`).
"""

from __future__ import annotations

import argparse
import ast
import codecs
import functools
import hashlib
import importlib.util
import json
import math
import os
import pathlib
import shutil
import sys
import sysconfig
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
DTYPES = ("float32", "bfloat16", "float16")

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2 in every tokenizer built here

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Linear and embedding weights get std INIT_GAIN / sqrt(hidden_size): the final-norm output
# has entries of size ~1, so a logit's std is ~INIT_GAIN (times the norm weight).
INIT_GAIN = 3.0
BIAS_STD = 0.5
NORM_JITTER = 0.1

_TOKENIZER_RECIPE = 1  # bump when the corpus or the trainer settings change
_DEMO_RECIPE = 1  # bump when the demo model's shape changes
_DEMO_SHAPE: dict[str, Any] = dict(
    arch="llama", vocab_size=2048, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096, seed=0,
)  # fmt: skip
_SKIP_STDLIB_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "tkinter"}

_ENGLISH = """\
Hello there! How are you today? I am fine, thank you. Good morning, good afternoon and good night.
Say hello in three languages: hello, bonjour, hola. In German one says hallo, and in Italian ciao.
Q: What is two plus three?
A: 5
Q: What is ten plus seven?
A: 17
The story begins on a quiet morning in a small town by the sea. A girl named Anna walked to the
market with her grandmother. They bought bread, apples, cheese and a bunch of yellow flowers.
On the way home they met an old man who told them about the ships that sailed long ago.
A language model reads a sequence of tokens and predicts the next one. The tokens come from a
tokenizer, which turns text into numbers and numbers back into text. A serving runtime batches
many requests together, keeps the key and value cache of every prefix it has seen, and returns
the generated text to each user as it is produced.
The assistant answers questions politely and briefly. The user asks for help with a recipe, a
poem, a list of ideas or a piece of code. The system message sets the rules of the conversation.
One, two, three, four, five, six, seven, eight, nine, ten. Monday, Tuesday, Wednesday, Thursday,
Friday, Saturday and Sunday. January, February, March, April, May, June, July, August,
September, October, November and December. Red, green, blue, black, white and gray.
"""


# ----------------------------------------------------------------------------- paths


def cache_dir() -> pathlib.Path:
    """Where trained tokenizers and the demo model live: `$LOOM_CACHE`, else `~/.cache/loom`."""
    root = os.environ.get("LOOM_CACHE")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "loom"


# ----------------------------------------------------------------------------- tokenizer


def _zen_of_python() -> str:
    """The Zen of Python, read from `this.py` without importing it (importing prints)."""
    spec = importlib.util.find_spec("this")
    if spec is None or not spec.origin or not os.path.isfile(spec.origin):
        return ""
    tree = ast.parse(pathlib.Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "s" for t in node.targets):
            return codecs.decode(ast.literal_eval(node.value), "rot13")
    return ""


def _corpus() -> list[str]:
    """Deterministic training text: English paragraphs, the Zen of Python, the stdlib's source.

    The stdlib (docstrings, comments and code, ~10 MB) is what lets large vocabularies fill up;
    the English part is repeated so that common words get whole-word tokens even when small.
    """
    texts = [_ENGLISH] * 20 + [_zen_of_python()] * 5
    stdlib = sysconfig.get_paths()["stdlib"]
    files: list[str] = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIP_STDLIB_DIRS and not d.startswith(("__pycache__", "config-"))]
        rel = os.path.relpath(root, stdlib)
        files += [pathlib.PurePath(rel, n).as_posix() for n in names if n.endswith(".py")]
    for name in sorted(files):
        try:
            texts.append(pathlib.Path(stdlib, name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
    return texts


def tiny_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with at most `vocab_size` tokens (cached per size, on disk and in memory).

    Ids 0, 1, 2 are `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`; every byte string encodes.
    The result can be smaller than asked when the corpus runs out of merges.

    Raises:
        ValueError: `vocab_size` below 259 (256 bytes + 3 special tokens).
    """
    from tokenizers import Tokenizer

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"tokenizer vocab_size={vocab_size} is too small: a byte-level BPE needs at least {minimum}")
    return Tokenizer.from_str(_tokenizer_json(vocab_size))  # a fresh object: callers may mutate it


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    """The trained tokenizer's JSON, from the disk cache (keyed by the corpus's hash) or trained now."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    texts = _corpus()
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
    cached = cache_dir() / "tokenizers" / f"bpe-r{_TOKENIZER_RECIPE}-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if cached.is_file():
        try:
            return Tokenizer.from_file(str(cached)).to_str()
        except Exception:  # a corrupt cache entry (e.g. a full disk): retrain and overwrite it
            pass

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    text = tokenizer.to_str()
    _atomic_write(cached, text)
    return text


def _atomic_write(path: pathlib.Path, text: str) -> None:
    """Write via a temp file and rename, so concurrent test workers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tokenizer(tokenizer: Any, path: pathlib.Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    path.joinpath("tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True
        }
        for tok in SPECIAL_TOKENS
    }  # fmt: skip
    special = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "pad_token": ENDOFTEXT, "unk_token": None}
    config = {
        **special,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    _write_json(path / "tokenizer_config.json", config)
    special_map = {k: v for k, v in special.items() if v is not None}
    _write_json(path / "special_tokens_map.json", {**special_map, "additional_special_tokens": [IM_START, IM_END]})


# ----------------------------------------------------------------------------- weights


def _hf_config(arch: str, *, head_dim: int, rope_theta: float, **shape: Any) -> Any:
    """The Transformers config object for `arch` (eos/bos/pad = `<|endoftext|>`, id 0)."""
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}
    # Full attention everywhere: no sliding window, as in Mistral v0.2+ and Qwen's defaults.
    extra: dict[str, Any] = {"sliding_window": None} if arch == "mistral" else {}
    if arch in ("qwen2", "qwen3"):
        extra["use_sliding_window"] = False
    config = getattr(transformers, classes[arch])(
        head_dim=head_dim, rope_theta=rope_theta, bos_token_id=0, eos_token_id=0, pad_token_id=0, **shape, **extra
    )
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return config


def _random_state_dict(config: Any, seed: int, init_std: float) -> dict[str, torch.Tensor]:
    """Float32 weights for `config`'s *ForCausalLM, drawn from one seeded generator in name order.

    Matrices ~ N(0, init_std); norm weights (incl. Qwen3's q_norm/k_norm) ~ 1 + N(0, 0.1), so a
    loader that skips them is caught; biases (Qwen2's q/k/v) ~ N(0, 0.5). A tied lm_head is left
    out, as `save_pretrained` does.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # names and shapes only: no memory, no Transformers init, no global RNG
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # shared (tied) parameters are listed once
        noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
        if name.endswith(".bias"):
            state[name] = noise * BIAS_STD
        elif param.ndim == 1:
            state[name] = 1.0 + NORM_JITTER * noise
        else:
            state[name] = noise * init_std
    if not config.tie_word_embeddings:
        assert "lm_head.weight" in state, "an untied model must have its own lm_head"
    return state


def _save_weights(state: dict[str, torch.Tensor], path: pathlib.Path, num_shards: int) -> None:
    """model.safetensors, or num_shards contiguous shards plus model.safetensors.index.json."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    if num_shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata=meta)
        return
    names = list(state)
    assert 1 < num_shards <= len(names), f"cannot split {len(names)} tensors into {num_shards} shards"
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    total = sum(sizes)
    shards: list[list[str]] = [[]]
    filled = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        left_tensors, left_shards = len(names) - i, num_shards - len(shards)
        full = filled >= total * len(shards) / num_shards
        if shards[-1] and left_shards and (full or left_tensors == left_shards):
            shards.append([])
        shards[-1].append(name)
        filled += size
    assert len(shards) == num_shards and all(shards), f"sharding produced {[len(s) for s in shards]}"
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        filename = f"model-{k:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: state[n] for n in shard}, str(path / filename), metadata=meta)
        weight_map.update(dict.fromkeys(shard, filename))
    index = {
        "metadata": {"total_parameters": sum(t.numel() for t in state.values()), "total_size": total},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(path / "model.safetensors.index.json", index)


# ----------------------------------------------------------------------------- public API


def build_tiny_checkpoint(
    path: str | os.PathLike,
    arch: str = "llama",
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int | None = None,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    dtype: str = "float32",
    num_shards: int = 1,
    seed: int = 0,
    init_std: float | None = None,
    tokenizer_vocab_size: int | None = None,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-6,
) -> pathlib.Path:
    """Write a random-weight `arch` checkpoint with its tokenizer into `path`; return the path.

    Deterministic in all arguments. `init_std` defaults to `INIT_GAIN / sqrt(hidden_size)`.
    The tokenizer has `tokenizer_vocab_size or vocab_size` tokens at most (fewer when the corpus
    runs out of merges), never more than the model's `vocab_size`. Files already in `path` with
    the same names are overwritten.

    Raises:
        ValueError: unknown `arch` or `dtype`, heads that do not divide, too many shards, or a
            tokenizer vocabulary larger than the model's or smaller than 259.
    """
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} is not a multiple of num_key_value_heads={num_key_value_heads}"
        )
    if head_dim is None:
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}; pass head_dim"
            )
        head_dim = hidden_size // num_attention_heads
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    tok_vocab = tokenizer_vocab_size or vocab_size
    if tok_vocab > vocab_size:
        raise ValueError(f"tokenizer_vocab_size={tok_vocab} exceeds the model's vocab_size={vocab_size}")
    init_std = INIT_GAIN / math.sqrt(hidden_size) if init_std is None else init_std

    config = _hf_config(
        arch, head_dim=head_dim, rope_theta=rope_theta, vocab_size=vocab_size, hidden_size=hidden_size,
        intermediate_size=intermediate_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=tie_word_embeddings,
        rms_norm_eps=rms_norm_eps, initializer_range=init_std,
    )  # fmt: skip
    state = _random_state_dict(config, seed, init_std)
    if num_shards > len(state):
        raise ValueError(f"num_shards={num_shards} exceeds the model's {len(state)} tensors")
    torch_dtype = getattr(torch, dtype)
    state = {name: t.to(torch_dtype).contiguous() for name, t in state.items()}
    tokenizer = tiny_tokenizer(tok_vocab)

    out = pathlib.Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _save_tokenizer(tokenizer, out, max_position_embeddings)
    for stale in [*out.glob("model*.safetensors"), out / "model.safetensors.index.json"]:
        stale.unlink(missing_ok=True)
    _save_weights(state, out, num_shards)
    # Older readers look for the top-level "rope_theta" / "torch_dtype" keys; Transformers 5
    # writes "rope_parameters" / "dtype" and accepts both, as hub checkpoints carry either.
    config_dict = {**config.to_diff_dict(), "dtype": dtype, "rope_theta": rope_theta, "torch_dtype": dtype}
    _write_json(out / "config.json", config_dict)

    from transformers import GenerationConfig, __version__

    # Chat models stop at <|im_end|> too, as Qwen's instruct checkpoints say in this file.
    generation = GenerationConfig(bos_token_id=0, eos_token_id=[0, tokenizer.token_to_id(IM_END)], pad_token_id=0)
    _write_json(out / "generation_config.json", {**generation.to_diff_dict(), "transformers_version": __version__})
    return out


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
        _write_json(tmp / ".loom-demo.json", spec)
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
