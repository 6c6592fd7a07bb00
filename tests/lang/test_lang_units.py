"""The language's pieces without a server: chat-template splitting, choice methods, import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest

from loom.checkpoint_writer import CHAT_TEMPLATE
from loom.lang.chat_template import ChatTemplateError, from_jinja
from loom.lang.choices import ChoiceScores, greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized

DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
)
NO_SYSTEM = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}"
)


def test_chatml_roles() -> None:
    t = from_jinja(CHAT_TEMPLATE)
    assert t.prefix == {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
    assert set(t.suffix.values()) == {"<|im_end|>\n"} and t.preamble == ""


def test_default_system_prompt_becomes_the_preamble() -> None:
    t = from_jinja(DEFAULT_SYSTEM)
    assert t.preamble == "<|im_start|>system\nYou are helpful.<|im_end|>\n"
    assert t.prefix["user"] == "<|im_start|>user\n"


def test_bos_stays_out_of_the_role_prefixes() -> None:
    t = from_jinja(LLAMA3, bos_token="<s>")
    assert t.prefix["system"] == "<s><|start_header_id|>system<|end_header_id|>\n\n"
    assert t.prefix["user"] == "<|start_header_id|>user<|end_header_id|>\n\n" and t.suffix["user"] == "<|eot_id|>"
    assert t.preamble == "<s>"


def test_a_template_without_system_role() -> None:
    t = from_jinja(NO_SYSTEM, bos_token="<bos>")
    assert t.prefix["assistant"] == "<start_of_turn>model\n" and t.preamble == "<bos>"
    with pytest.raises(ChatTemplateError, match="no 'system' role"):
        t.role_prefix("system")


def test_a_template_that_rerenders_history_is_refused() -> None:
    with pytest.raises(ChatTemplateError, match="re-renders earlier turns"):
        from_jinja("{% for m in messages|reverse %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")


def scores(lps: list[list[float]], uncond: list[list[float | None]] | None = None) -> ChoiceScores:
    return ChoiceScores([f"c{i}" for i in range(len(lps))], lps, [[0] * len(x) for x in lps], uncond)


def test_choice_methods_on_hand_made_scores() -> None:
    lps = [[-1.0, -5.0], [-0.5, -4.0, -0.1], [-2.0]]
    assert token_length_normalized.decide(scores(lps)).choice == "c1"  # means -3.0, -1.53, -2.0
    assert greedy_token_selection.decide(scores(lps)).choice == "c1"  # first tokens -1.0, -0.5, -2.0
    # A tie on the first token is broken by the second; a shorter choice is padded with its mean.
    tied = [[-1.0, -3.0], [-1.0], [-1.0, -0.5]]
    assert greedy_token_selection.decide(scores(tied)).choice == "c2"
    # Unconditional: the choice the prompt makes most likely *relative* to its own likelihood.
    uncond: list[list[float | None]] = [[None, -0.1], [None, -6.0, -0.1], [None]]
    decision = unconditional_likelihood_normalized.decide(scores(lps, uncond))
    assert decision.scores == pytest.approx([(-1.0 + -4.9) / 2, (-0.5 + 2.0 + 0.0) / 3, -2.0])
    assert decision.choice == "c1"


def test_import_loom_lang_is_light() -> None:
    code = "import sys, loom, loom.lang; loom.gen; print(sorted(m for m in ('torch', 'transformers', 'openai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
