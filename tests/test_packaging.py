"""The project installs as one `loom` namespace: every subpackage lands in the built wheel, and
the README's main job (`python -m loom demo`) runs."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"loom": "loom", "lang": "loom.lang", "runtime": "loom.runtime", "radix_cache": "loom.radix_cache", "kernels": "loom.kernels"}


def source_packages() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    return found


@pytest.mark.slow
def test_wheel_holds_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("loom-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith("__init__.py")}
    missing = source_packages() - in_wheel
    assert not missing, f"packages missing from the wheel (add them to pyproject.toml): {sorted(missing)}"
    assert "loom/runtime/scheduler.py" in names and "loom/radix_cache/radix_cache.py" in names


def test_every_package_imports():
    import importlib

    for package in sorted(source_packages()):
        importlib.import_module(package)


def test_cli_help_explains_commands():
    top = subprocess.run([sys.executable, "-m", "loom", "--help"], capture_output=True, text=True, check=True)
    assert "demo" in top.stdout and "serve" in top.stdout
    out = subprocess.run([sys.executable, "-m", "loom", "demo", "--help"], capture_output=True, text=True, check=True)
    assert "--model" in out.stdout and "LOOM_MODEL" in out.stdout


@pytest.mark.slow
def test_demo_runs_and_says_the_weights_are_random(tmp_path):
    env = {**os.environ, "LOOM_CACHE": str(tmp_path)}
    env.pop("LOOM_MODEL", None)
    out = subprocess.run(
        [sys.executable, "-m", "loom", "demo", "--max-new-tokens", "4"], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "RANDOM WEIGHTS" in out.stdout
    assert "came from the radix cache" in out.stdout
    # The table's last three columns are prompt, cached and new tokens: every question after the
    # first reuses the cached few-shot prefix.
    rows = [line.split()[-3:] for line in out.stdout.splitlines() if line.startswith("What is")]
    assert len(rows) == 6, out.stdout
    cached = [int(c) for _, c, _ in rows]
    assert sum(c > 0 for c in cached) >= 5, out.stdout
