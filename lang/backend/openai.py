"""`OpenAI`: any OpenAI-compatible server through the official `openai` package.

A program inside chat roles becomes a chat completion of its messages (the `gen` must sit in an
assistant turn with nothing before it in that turn: the chat API cannot continue a partial reply);
plain text becomes a text completion. What the API cannot do fails with a message saying so:
`select` (the API gives no prompt log-probabilities to score choices with), `regex`, `dtype`.
With `run(stream=True)` a `gen` streams (`stream=True` on the API): `text_iter` and
`text_async_iter` yield each chunk's text as it arrives.
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

    def _request_kwargs(self, s: PromptState, params: SamplingParams) -> tuple[bool, dict[str, Any]]:
        """Whether the request is a chat completion (else a text completion), and its arguments."""
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
            return True, {"messages": messages, **kwargs}
        if params.json_schema is not None:
            raise ValueError("gen(json_schema=...) with the OpenAI backend needs chat roles (response_format)")
        return False, {"prompt": s.text, **kwargs}

    def _create(self, chat: bool, **kwargs: Any) -> Any:
        api = self.client.chat.completions if chat else self.client.completions
        return api.create(**kwargs)

    def generate(self, s: PromptState, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        chat, kwargs = self._request_kwargs(s, params)
        out = self._create(chat, **kwargs)
        choice = out.choices[0]
        text = (choice.message.content or "") if chat else choice.text
        return text, _meta(out.id, out.usage, choice.finish_reason)

    def generate_stream(self, s: PromptState, params: SamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        """The completion as the server streams it (`stream=True`), one text delta per chunk; the
        last pair carries the usage (asked for with `stream_options.include_usage`)."""
        chat, kwargs = self._request_kwargs(s, params)
        meta = _meta(None, None, None)
        with self._create(chat, stream=True, stream_options={"include_usage": True}, **kwargs) as stream:
            for chunk in stream:
                finish = None
                delta = ""
                for choice in chunk.choices:  # one choice (n=1); the usage chunk has none
                    delta += (choice.delta.content or "") if chat else (choice.text or "")
                    finish = choice.finish_reason or finish
                meta = _meta(chunk.id, chunk.usage or None, finish, meta)
                if delta:
                    yield delta, meta
        yield "", meta

    def select(self, s: PromptState, choices: list[str], temperature: float, method: ChoicesMethod) -> Decision:
        raise ValueError("select(): the OpenAI API gives no log-probabilities of prompt tokens, so choices cannot be "
                         "scored; use RuntimeEndpoint (or gen with a stop) instead")  # fmt: skip


def _meta(rid: str | None, usage: Any, finish_reason: str | None, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """meta_info in the native backend's shape from an OpenAI answer (or chunk: what it lacks is
    kept from `before`, the meta_info of the chunks so far)."""
    meta = dict(before or {"id": None, "prompt_tokens": None, "completion_tokens": None, "finish_reason": None})
    if rid is not None:
        meta["id"] = rid
    if finish_reason is not None:
        meta["finish_reason"] = finish_reason
    if usage is not None:
        meta["prompt_tokens"] = usage.prompt_tokens
        meta["completion_tokens"] = usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)  # a plain dict in openai releases without its type
        cached = details.get("cached_tokens") if isinstance(details, dict) else getattr(details, "cached_tokens", None)
        if cached is not None:
            meta["cached_tokens"] = cached
    return meta


def _chat_messages(s: PromptState) -> tuple[list[dict[str, Any]], bool]:
    """The finished turns, and whether an open assistant turn already holds text."""
    role = getattr(s, "_role", None)
    if role is None:
        return list(s.messages), False
    name, start = role
    if name != "assistant":
        raise ValueError(f"gen() inside a {name}() turn: with the OpenAI backend, generate in an assistant turn")
    return list(s.messages), bool(s.text[start:])
