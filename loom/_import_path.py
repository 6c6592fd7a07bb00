"""Keep Loom's own folders, and a user's working directory, from shadowing installed packages.

Loom's source tree holds top-level folders named `kernels/`, `runtime/` and `lang/`; they are
meant to be imported only as `loom.kernels`, `loom.runtime` and `loom.lang` (the installed finder
maps them there). Whenever the checkout's root is on `sys.path` (`python -m ...` and
`python -c ...` prepend the working directory), those folders become top-level modules too and
shadow installed packages of the same name: transformers >= 5.25 imports Hugging Face's
`kernels` and got Loom's instead. The same happens to `python -m loom` run from any folder
that holds a `kernels/` of its own.

The mechanism is two removals from `sys.path`, both stdlib-only and done before anything heavy
is imported:

- `drop_source_root()` runs on `import loom` in every process: it removes the entries that
  point at Loom's checkout root (the folder that holds `loom/` beside `lang/`, `runtime/`,
  `kernels/` and `pyproject.toml`). Loom itself stays importable through its installed finder,
  so nothing that should import is lost. An installed wheel has no such root, and then this
  does nothing.
- `drop_working_directory()` runs in processes Loom itself starts (`python -m loom ...`: the
  CLI, `loom serve`, and the children `loom.Engine` / `loom.Runtime` start): it removes the
  working directory that `-m` put first, as Python 3.11's `-P` / PYTHONSAFEPATH would (3.10 has
  neither). The scheduler, detokenizer, tensor-parallel ranks and data-parallel replicas are
  started by multiprocessing's spawn, which hands them this cleaned `sys.path`, so no engine
  process depends on the working directory it was started from.

A user's own interpreter keeps its working directory on `sys.path`: `import loom` removes only
Loom's checkout root, never a folder that may hold the user's modules.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_SOURCE_FOLDERS = ("lang", "runtime", "kernels", "radix_cache")


def source_root() -> Path | None:
    """The checkout root this `loom` package was imported from, or None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and all((root / d / "__init__.py").is_file() for d in _SOURCE_FOLDERS):
        return root
    return None


def _resolves_to(entry: str, folder: Path) -> bool:
    try:
        return Path(entry or os.curdir).resolve() == folder
    except OSError:  # a working directory that was removed, an unreadable entry: not ours
        return False


def drop_source_root() -> None:
    """Remove every `sys.path` entry that makes Loom's checkout folders top-level modules."""
    root = source_root()
    if root is not None:
        sys.path[:] = [entry for entry in sys.path if not _resolves_to(entry, root)]


def drop_working_directory() -> None:
    """Remove the working directory that `python -m` put first on `sys.path` (a no-op under `-P`)."""
    if getattr(sys.flags, "safe_path", False) or not sys.path:
        return
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return
    if _resolves_to(sys.path[0], cwd):
        del sys.path[0]
