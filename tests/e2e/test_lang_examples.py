"""Every example in examples/ runs on a tiny model, started by the example itself (`--model`) and
through a running `loom serve` (`--url`), prints what it promises and saves its run picture."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server, serving

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"

CASES = [
    ("quickstart.py", ["system: 'You are a helpful assistant.'", "helpful: ", "streamed:"]),
    ("json_extraction.py", ["'age': ", "| phone: +"]),
    ("agent_branches.py", ["branch 1: plan=", "branch 2: plan="]),
    ("few_shot_classification.py", ["Great coffee, friendly people.", "Best bread in town."]),
]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("examples"), arch="llama", vocab_size=512, seed=3)


@pytest.fixture(scope="module")
def server(model) -> Iterator[Server]:
    with serving(model) as srv:
        yield srv


def run_example(name: str, *flags: str) -> str:
    args = [sys.executable, str(EXAMPLES / name), *flags]
    if name == "few_shot_classification.py":
        args.append("--no-progress")
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "failed:" not in out.stdout
    return out.stdout


def check_picture(path: pathlib.Path, stdout: str) -> None:
    assert f"run picture: {path}" in stdout
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    kinds = re.findall(r'data-kind="(\w+)"', page)
    assert kinds and set(kinds) <= {"gen", "select", "commit", "warm"}


@pytest.mark.parametrize("name, expected", CASES)
def test_example_runs_with_model(model, tmp_path, name, expected) -> None:
    picture = tmp_path / "run.html"
    stdout = run_example(name, "--model", str(model), "--trace", str(picture))
    for fragment in expected:
        assert fragment in stdout, stdout
    check_picture(picture, stdout)
    if name == "agent_branches.py":  # the picture shows the fork tree
        page = picture.read_text()
        assert '<div class="fork" data-size="2">' in page
        assert re.findall(r'<div class="branch" data-branch="(\d+)"', page) == ["0", "1"]
        # Each branch's first call starts from the fork's committed prefix: it shows cached tokens.
        for i in (0, 1):
            m = re.search(r'data-branch="%d" data-prompt-tokens="\d+" data-cached-tokens="(\d+)"' % i, page)
            assert m and int(m.group(1)) > 0, page


@pytest.mark.parametrize("name, expected", CASES)
def test_example_runs_with_url(server, name, expected) -> None:
    stdout = run_example(name, "--url", server.url)
    for fragment in expected:
        assert fragment in stdout, stdout
    assert "run picture:" not in stdout  # only with --trace
