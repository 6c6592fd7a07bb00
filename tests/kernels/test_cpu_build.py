"""The CPU kernels' build survives a build that was killed: torch's `lock` file, left behind in the
build folder, made every later process wait on it for ever (a CI job hung this way for its whole
budget). Loom's builds hold an flock, which dies with its process, and remove such a file under it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from loom.kernels.cpu import _build_directory, _build_spec, _exclusive_build, extension

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the C++ kernel is built on x86-64 only")


def test_a_lock_left_by_a_killed_build_is_removed(tmp_path):
    (tmp_path / "lock").touch()
    with _exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_a_build_in_progress_is_waited_for(tmp_path):
    """Another process holds the flock (it is building): ours starts only after it let go, and its
    torch lock file is not removed from under it."""
    holder = textwrap.dedent(f"""
        import fcntl, pathlib, sys, time
        d = pathlib.Path({str(tmp_path)!r})
        with open(d / "loom.flock", "w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            (d / "lock").touch()
            print("holding", flush=True)
            time.sleep(1.0)
            (d / "lock").unlink()
            (d / "released").touch()
    """)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        with _exclusive_build(tmp_path):
            assert (tmp_path / "released").exists()
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_new_process_loads_the_kernels_past_a_stale_lock():
    assert extension() is not None  # built (or found) in this process first
    folder = _build_directory(_build_spec()[0])
    (folder / "lock").touch()
    try:
        code = "from loom.kernels.cpu import extension; assert extension() is not None"
        done = subprocess.run([sys.executable, "-c", code], timeout=240, capture_output=True, text=True, env=os.environ)
    finally:
        (folder / "lock").unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "removing" in done.stderr and "was stopped" in done.stderr
