"""Smoke test of benchmarks/bench_grammar.py's MaskBench path on a tiny vocabulary and a hand-made case."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
bench_grammar = pytest.importorskip("bench_grammar")


def test_maskbench_split_names() -> None:
    assert bench_grammar.maskbench_split("Github_easy---o11171.json") == "Github_easy"
    assert bench_grammar.maskbench_split("BFCL_java_0.json") == "BFCL"
    assert bench_grammar.maskbench_split("JME_37.json") == "JME"


@pytest.mark.parametrize("backend", ["outlines", "llguidance"])
def test_maskbench_accepts_valid_and_rejects_invalid(backend: str, tmp_path: pathlib.Path) -> None:
    pytest.importorskip(backend if backend != "outlines" else "outlines_core")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}  # fmt: skip
    tests = [{"valid": True, "data": {"n": 3}}, {"valid": False, "data": {"n": 12}}, {"valid": False, "data": {"m": 3}}]
    path = tmp_path / "Handmade---case.json"
    path.write_text(json.dumps({"schema": schema, "tests": tests}))
    bench_grammar._init_worker(512, None)
    res = bench_grammar.run_maskbench_job(backend, str(path))
    assert res.status == "compiled", res.message
    assert (res.split, res.valid_accepted, res.valid_total) == ("Handmade", 1, 1)
    assert (res.invalid_rejected, res.invalid_total) == (2, 2)
    assert res.passed  # MaskBench's "passing": compiled, every instance judged right
    table = bench_grammar.maskbench_table([res], [backend])
    assert "| Handmade | 1 | - | **1.00** / 1/1 / 1/1 (1.00) / 2/2 (1.00) |" in table
