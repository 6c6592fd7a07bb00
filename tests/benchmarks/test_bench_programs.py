"""benchmarks/bench_programs.py --quick runs every workload on a tiny model and prints the full table."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_programs.py"
WORKLOADS = ("mmlu", "hellaswag", "tot", "json", "chat", "react")


@pytest.mark.slow
def test_quick_run_prints_every_workload(tmp_path) -> None:
    model = build_tiny_checkpoint(tmp_path / "model", arch="llama", vocab_size=512, seed=3)
    figure = tmp_path / "programs.png"
    out = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--model", str(model), "--figure", str(figure)],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    for w in WORKLOADS:
        assert w in rows, out.stdout
        cells = [c.strip() for c in rows[w].split("|")[1:-1]]
        assert cells[1] == "2 / 1", rows[w]  # 2 programs for Loom, 1 for Transformers in --quick
        assert cells[5].endswith("x") and cells[6].endswith("x") and cells[7].endswith("%"), rows[w]
    assert "Traceback" not in out.stderr
    # Loom's selects agree with Transformers' scoring on the same weights.
    for w in ("mmlu", "hellaswag"):
        assert f"- {w}: Loom's decisions equal Transformers' on 1/1 programs; radix on == off: True" in out.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert figure.stat().st_size > 0
