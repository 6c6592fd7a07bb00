"""Where Loom keeps what it builds on this machine: trained tokenizers, the demo model and the
benchmark models, under `$LOOM_CACHE` (default `~/.cache/loom`)."""

from __future__ import annotations

import os
import pathlib


def cache_dir() -> pathlib.Path:
    """Where trained tokenizers and the demo model live: `$LOOM_CACHE`, else `~/.cache/loom`."""
    root = os.environ.get("LOOM_CACHE")
    return pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "loom"
