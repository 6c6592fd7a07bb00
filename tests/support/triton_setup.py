"""Shared set-up for the Triton test modules: build the kernels under Triton's interpreter on the
CPU (on a GPU when there is one) without leaking TRITON_INTERPRET into other test modules."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest
import torch

CUDA = torch.cuda.is_available()
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
# `triton.jit` (Triton's own tl.* library included) reads TRITON_INTERPRET when a kernel is defined:
# conftest.py builds the kernels with the interpreter on, before anything else can import triton, and
# switches it off again so that no other test module sees it; the `interpreter` fixture switches it on
# for this module's tests (Triton reads it again at launch).
import loom.kernels.triton as kt  # noqa: E402

assert CUDA or kt.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 could be set (see conftest.py)"

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
