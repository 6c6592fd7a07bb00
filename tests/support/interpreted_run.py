"""Run a test script in a fresh interpreter with Triton's interpreter on (without a GPU), and read
back the JSON it prints on its `RESULT ` line.

TRITON_INTERPRET must be set before Triton is first imported, so engine-level Triton tests run their
engines in a child process; this test process, and every other test module, stays without it.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import torch


def run_interpreted(script: str, *args: str, timeout: float = 600) -> Any:
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=pathlib.Path(__file__).parent,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
