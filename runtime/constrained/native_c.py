"""Small C sources compiled once per machine and loaded with ctypes: the grammar engine's hot loops
(token_walk.py's trie walks, subset_native.py's lazy-DFA subset step).

No Python headers are needed: the system's C compiler (`$CC`, else cc / gcc / clang) builds a
shared object into the Loom cache folder, named by the source's hash, so a changed source is a new
file and processes sharing the folder never load a stale one. Where there is no compiler, or it
fails, callers get None and keep their Python or numpy path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile

logger = logging.getLogger(__name__)


def compile_c(source: str, name: str, what: str, *, hold_gil: bool = False) -> ctypes.CDLL | None:
    """`source` compiled (once per machine) and loaded; None where no C compiler is at hand or
    compiling fails (logged with `what`, the job that falls back). `hold_gil`: calls keep the GIL
    (ctypes.PyDLL), for functions that must not run beside Python threads touching their buffers."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        return None
    from loom.cache_dir import cache_dir

    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    path = cache_dir() / "kernels" / f"{name}_{digest}.so"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            src, out = os.path.join(tmp, f"{name}.c"), os.path.join(tmp, f"{name}.so")
            with open(src, "w") as fh:
                fh.write(source)
            try:
                subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", out, src], check=True, capture_output=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as e:
                logger.warning("%s could not be compiled (%s); using the Python path", what, e)
                return None
            os.replace(out, path)  # atomic: another process may be doing the same
    return (ctypes.PyDLL if hold_gil else ctypes.CDLL)(str(path))
