"""Every example in examples/ runs against a real `loom serve` on a tiny model and prints what it promises."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from loom.demo_model import build_tiny_checkpoint
from server_proc import Server

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    srv = Server(build_tiny_checkpoint(tmp_path_factory.mktemp("examples"), arch="llama", vocab_size=512, seed=3))
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.mark.parametrize("name, expected", [
    ("quickstart.py", ["system: 'You are a helpful assistant.'", "helpful: ", "streamed:"]),
    ("json_extraction.py", ["'age': ", "| phone: +"]),
    ("agent_branches.py", ["branch 1: plan=", "branch 2: plan="]),
    ("few_shot_classification.py", ["Great coffee, friendly people.", "Best bread in town."]),
])  # fmt: skip
def test_example_runs(server, name, expected) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLES / name), "--url", server.url], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for fragment in expected:
        assert fragment in out.stdout, out.stdout
    assert "failed:" not in out.stdout
