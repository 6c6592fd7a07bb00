"""The tiny tokenizer: a byte-level BPE trained locally (no hub access), for the random-weight
checkpoints that tests, benchmarks and the demo run on.

The corpus is English text built in code, the Zen of Python and the Python standard library's own
source, so the same interpreter always trains the same tokenizer. Ids 0, 1, 2 are the special
tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`. Trained tokenizers are cached per vocabulary
size under the cache dir (`loom/cache_dir.py`), keyed by the corpus's hash.
"""

from __future__ import annotations

import ast
import codecs
import functools
import hashlib
import importlib.util
import os
import pathlib
import sysconfig
import tempfile
from typing import TYPE_CHECKING

from loom.cache_dir import cache_dir

if TYPE_CHECKING:
    from tokenizers import Tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # ids 0, 1, 2 in every tokenizer built here

_TOKENIZER_RECIPE = 1  # bump when the corpus or the trainer settings change
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


def corpus() -> list[str]:
    """Deterministic training text: English paragraphs, the Zen of Python, the stdlib's source.

    The stdlib (docstrings, comments and code, ~10 MB) is what lets large vocabularies fill up;
    the English part is repeated so that common words get whole-word tokens even when small.
    A new list on every call: a caller may extend it to train a larger vocabulary of its own.
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

    texts = corpus()
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
