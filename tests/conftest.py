"""Shared pytest fixtures, and where the tests find their helpers.

The tests lie in folders named after the source (runtime/, lang/, kernels/, radix_cache/, loom/;
e2e/ starts real server processes; benchmarks/ runs the benchmark scripts small). Helpers that
several of them use live in tests/support/ and are imported by module name (`from server_proc
import Server`); tests/data/ holds data files.

Tiny random-weight checkpoints in the Hugging Face layout (see `loom.checkpoint_writer`), built once
per test session under pytest's temp dir. A test module that needs a checkpoint with its own
seed or shape calls `make_tiny_model(arch, **kwargs)`; equal arguments share one folder, so
treat the folders as read-only.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import pytest

from loom.checkpoint_writer import ARCHS, build_tiny_checkpoint

HERE = pathlib.Path(__file__).resolve().parent


def _support_on_path() -> None:
    """tests/support/ on sys.path; tests/ itself off it. pytest put tests/ there to import this
    file, but its folders are named like Loom's (kernels/, runtime/, lang/, loom/) and must not
    become namespace packages that answer `import kernels` (Hugging Face's package) or `import
    loom` in place of the installed ones."""
    sys.path[:] = [entry for entry in sys.path if pathlib.Path(entry or ".").resolve() != HERE]
    support = str(HERE / "support")
    if support not in sys.path:
        sys.path.insert(0, support)


_support_on_path()


def _build_triton_kernels_interpreted() -> None:
    """Define Loom's Triton kernels under Triton's interpreter on a CPU-only machine, now, before
    any test module (or a library it imports, such as sglang) imports triton without it: Triton
    reads TRITON_INTERPRET when it is imported and when a kernel is defined. The variable is
    restored at once; tests/support/triton_setup.py switches it on again for the kernel tests only."""
    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import loom.kernels.triton  # noqa: F401
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


_build_triton_kernels_interpreted()

MakeTinyModel = Callable[..., pathlib.Path]


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> MakeTinyModel:
    """`make(arch="llama", **build_tiny_checkpoint_kwargs) -> Path`, cached by its arguments."""
    built: dict[tuple[str, tuple[tuple[str, Any], ...]], pathlib.Path] = {}

    def make(arch: str = "llama", **kwargs: Any) -> pathlib.Path:
        key = (arch, tuple(sorted(kwargs.items())))
        if key not in built:
            built[key] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model_dir(request: pytest.FixtureRequest, make_tiny_model: MakeTinyModel) -> pathlib.Path:
    """The default tiny checkpoint of each architecture in turn (the test runs once per arch)."""
    return make_tiny_model(request.param)


@pytest.fixture(scope="session")
def llama_dir(make_tiny_model: MakeTinyModel) -> pathlib.Path:
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def qwen2_dir(make_tiny_model: MakeTinyModel) -> pathlib.Path:
    return make_tiny_model("qwen2")


@pytest.fixture(scope="session")
def qwen3_dir(make_tiny_model: MakeTinyModel) -> pathlib.Path:
    return make_tiny_model("qwen3")


@pytest.fixture(scope="session")
def mistral_dir(make_tiny_model: MakeTinyModel) -> pathlib.Path:
    return make_tiny_model("mistral")


@pytest.fixture
def float_activations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU's quantized kernels with x kept in fp32 (LOOM_CPU_INT8_ACT=0): exact to the summation
    order, for tests that hold quantized layers to their dequantised float reference or a quantized
    engine to the float engine's greedy tokens. The default (x in int8 blocks, llama.cpp's arithmetic)
    has its own bounds (tests/kernels/test_qlinear_int8.py, test_cpu_decode.py)."""
    monkeypatch.setenv("LOOM_CPU_INT8_ACT", "0")
