"""benchmarks/bench_qlinear.py on one layer: a row of the table per row count, every kernel this build has timed."""

from __future__ import annotations

import pathlib
import platform
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "bench_qlinear.py"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the C++ kernels are built on x86-64 only")
def test_one_layer_prints_a_row_per_row_count() -> None:
    from loom.kernels.cpu import extension

    out = subprocess.run([sys.executable, str(SCRIPT), "--layers", "1", "--rows", "1", "5", "--repeats", "1"],
                         capture_output=True, text=True, timeout=600, check=True).stdout  # fmt: skip
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r[0].strip() for r in rows] == ["1", "5"], out
    for cells in rows:
        timed = [c.strip() != "-" for c in cells[1:5]]
        assert timed == [extension().panels_built(), bool(extension().int8_isa()), True, True], out
