"""benchmarks/bench_ebnf_mask.py --nest: a row per nested grammar and backend, Loom with its masks at a
stack's top frames and with whole stacks."""

from __future__ import annotations

import pathlib
import subprocess
import sys

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ebnf_mask.py"


def test_nesting_prints_loom_with_and_without_stand_ins() -> None:
    out = subprocess.run([sys.executable, str(SCRIPT), "--nest", "12", "--vocab-size", "2048", "--backends", "loom"],
                         capture_output=True, text=True, timeout=600, check=True).stdout  # fmt: skip
    rows = [line.split() for line in out.splitlines() if line.startswith(("arith gbnf", "json gbnf"))]
    labels = [" ".join(r[2:-4]) for r in rows]
    assert labels == ["loom", "loom, whole stacks"] * 2, out
    for r in rows:
        assert all(float(x) >= 0 for x in r[-4:]), out
