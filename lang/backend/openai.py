"""`OpenAI`: any OpenAI-compatible server through the official `openai` package.

A program inside chat roles becomes a chat completion of its messages (the `gen` must sit in an
assistant turn with nothing before it in that turn: the chat API cannot continue a partial reply);
plain text becomes a text completion. What the API cannot do fails with a message saying so:
`select` (the API gives no prompt log-probabilities to score choices with), `regex`, `dtype`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from loom.lang.backend.base import Backend, PromptState
from loom.lang.chat_template import EMPTY, ChatTemplate
from loom.lang.choices import ChoicesMethod, Decision
from loom.lang.ir import SamplingParams


class OpenAI(Backend):
    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, **client_kwargs: Any) -> None:
        import openai

        self.model = model
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, **client_kwargs)

    def __repr__(self) -> str:
        return f"OpenAI({self.model!r}, base_url={str(self.client.base_url)!r})"

    def chat_template(self) -> ChatTemplate:
        return EMPTY  # roles go to the server as messages; it applies the template

    def _request(self, s: PromptState, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        if params.regex is not None or params.dtype is not None:
            raise ValueError("gen(regex=...) / gen(dtype=...): the OpenAI API cannot constrain output to a regex; "
                             "use RuntimeEndpoint for regex-constrained generation")  # fmt: skip
        stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or []) or None
        kwargs: dict[str, Any] = dict(
            model=self.model, max_tokens=params.max_new_tokens, stop=stop, temperature=params.temperature,
            top_p=params.top_p, frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
        )  # fmt: skip
        if s.messages or getattr(s, "_role", None) is not None:
            messages, open_turn = _chat_messages(s)
            if json_schema := params.json_schema:
                schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
            if open_turn:
                raise ValueError("gen() inside an assistant turn that already has text: the OpenAI chat API cannot "
                                 "continue a partial reply; put the gen first in the turn")  # fmt: skip
            out = self.client.chat.completions.create(messages=messages, **kwargs)
            text = out.choices[0].message.content or ""
        else:
            if params.json_schema is not None:
                raise ValueError("gen(json_schema=...) with the OpenAI backend needs chat roles (response_format)")
            out = self.client.completions.create(prompt=s.text, **kwargs)
            text = out.choices[0].text
        usage = out.usage
        meta = {
            "id": out.id,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "finish_reason": out.choices[0].finish_reason,
        }
        return text, meta

    def generate(self, s: PromptState, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        return self._request(s, params)

    def generate_stream(self, s: PromptState, params: SamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        yield self._request(s, params)

    def select(self, s: PromptState, choices: list[str], temperature: float, method: ChoicesMethod) -> Decision:
        raise ValueError("select(): the OpenAI API gives no log-probabilities of prompt tokens, so choices cannot be "
                         "scored; use RuntimeEndpoint (or gen with a stop) instead")  # fmt: skip


def _chat_messages(s: PromptState) -> tuple[list[dict[str, Any]], bool]:
    """The finished turns, and whether an open assistant turn already holds text."""
    role = getattr(s, "_role", None)
    if role is None:
        return list(s.messages), False
    name, start = role
    if name != "assistant":
        raise ValueError(f"gen() inside a {name}() turn: with the OpenAI backend, generate in an assistant turn")
    return list(s.messages), bool(s.text[start:])
