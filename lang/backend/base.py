"""Backends: what the interpreter asks of a model server.

`Backend` is the contract; `NativeBackend` implements it over a `Transport` speaking SGLang's
/generate protocol (`RuntimeEndpoint` over HTTP, `ZmqEndpoint` over the ZeroMQ front door).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

from loom.lang.backend.transport import Transport
from loom.lang.chat_template import ChatTemplate, from_model_info
from loom.lang.choices import ChoiceScores, ChoicesMethod, Decision
from loom.lang.ir import SamplingParams

SELECT_RECOMPUTE_CHARS = 32  # about 8 tokens


class PromptState(Protocol):
    """The executor as a backend sees it."""

    text: str
    messages: list[dict[str, Any]]
    # (chars, tokens): text[:chars] is known to tokenize to `tokens` tokens (from an earlier answer).
    token_mark: tuple[int, int] | None


class Backend:
    """One model behind a server. Methods may be called from many program threads at once."""

    def chat_template(self) -> ChatTemplate:
        raise NotImplementedError

    def generate(self, s: PromptState, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        """The completion of `s.text` and the runtime's meta_info."""
        raise NotImplementedError

    def generate_stream(self, s: PromptState, params: SamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        """(text delta, meta_info so far) pairs; the last pair carries the final meta_info."""
        text, meta = self.generate(s, params)
        yield text, meta

    def select(self, s: PromptState, choices: list[str], temperature: float, method: ChoicesMethod) -> Decision:
        raise NotImplementedError

    def commit(self, text: str) -> dict[str, Any] | None:
        """Prefill `text` so that later requests sharing it hit the cache (fork, run_batch).
        The meta_info of that prefill, or None where the backend has no cache to warm."""
        return None

    def check_image_support(self) -> None:
        raise ValueError(f"image(): {type(self).__name__} does not take images")

    def flush_cache(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class NativeBackend(Backend):
    """SGLang's native protocol over any transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._info: dict[str, Any] | None = None
        self._template: ChatTemplate | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ model
    @property
    def model_info(self) -> dict[str, Any]:
        with self._lock:
            if self._info is None:
                self._info = self.transport.get_model_info()
            return self._info

    def get_model_name(self) -> str:
        return str(self.model_info.get("model_path"))

    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = from_model_info(self.model_info)
        return self._template

    def check_image_support(self) -> None:
        info = self.model_info
        if not (info.get("is_multimodal") or info.get("has_image_understanding")):
            raise ValueError(
                f"image(): the model {info.get('model_path')!r} has no vision tower (its get_model_info reports "
                "no image support); use a vision-language model or drop the image"
            )

    # ------------------------------------------------------------------ requests
    def generate(self, s: PromptState, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        out = self.transport.generate(params.to_generate_body(s.text))
        assert isinstance(out, dict), f"/generate answered a list for one prompt: {out!r:.200}"
        return out["text"], out["meta_info"]

    def generate_stream(self, s: PromptState, params: SamplingParams) -> Iterator[tuple[str, dict[str, Any]]]:
        for event in self.transport.generate_stream(params.to_generate_body(s.text)):
            yield event["text"], event.get("meta_info", {})

    def commit(self, text: str) -> dict[str, Any] | None:
        if not text:
            return None
        out = self.transport.generate({"text": text, "sampling_params": {"max_new_tokens": 0}})
        assert isinstance(out, dict)
        return out["meta_info"]

    def select(self, s: PromptState, choices: list[str], temperature: float, method: ChoicesMethod) -> Decision:
        """All choices scored in one batched prefill request (see `score_choices`)."""
        if temperature > 1e-5:
            raise ValueError(f"select(temperature={temperature}): only greedy selection (temperature=0) is supported")
        return method.decide(self.score_choices(s, choices, method.requires_unconditional_logprobs))

    def score_choices(self, s: PromptState, choices: list[str], unconditional: bool = False) -> ChoiceScores:
        """Each choice's token log-probabilities after `s.text`.

        One batched prefill request, [prompt + choice_1, ...], with logprobs from the end of the
        cached prompt on, so that only the choices (and any text past the prompt's known length)
        are computed; where a choice merges with the prompt across the boundary, a request with
        the prompt alone beside the choices settles which tokens are the choice's. When the
        prompt's length in tokens is not known from an earlier answer, a prefill-only request
        commits the prompt first, which also puts it in the cache."""
        if not s.text:
            raise ValueError("select() needs some text before it: a choice is scored as a continuation of the prompt")
        mark = s.token_mark
        # Prompt positions past the mark are recomputed for every choice (their logprobs are asked
        # for, so they cannot come from the cache): past a few tokens, committing the prompt once
        # first is cheaper (a run_batch warm-up leaves the mark at the shared prefix, for one).
        if mark is None or len(s.text) - mark[0] > SELECT_RECOMPUTE_CHARS:
            meta = self.commit(s.text)
            assert meta is not None
            mark = (len(s.text), int(meta["prompt_tokens"]))
            s.token_mark = mark
        own = self._choice_tokens_after_mark(s.text, mark[1], choices)
        if own is None:  # a choice's tokens merge with the prompt's across the boundary
            own = self._choice_tokens_by_prompt_ids(s.text, mark[1], choices)
        results, spans = own
        token_logprobs = [[float(e[0]) for e in span] for span in spans]
        token_ids = [[int(e[1]) for e in span] for span in spans]
        metas = [out["meta_info"] for out in results]
        meta = {
            "prompt_tokens": sum(m["prompt_tokens"] for m in metas),
            "cached_tokens": sum(m.get("cached_tokens", 0) for m in metas),
            "input_token_logprobs": [m["input_token_logprobs"] for m in metas],
            "output_token_logprobs": [m.get("output_token_logprobs", []) for m in metas],
        }
        uncond = self._unconditional(token_ids) if unconditional else None
        return ChoiceScores(list(choices), token_logprobs, token_ids, uncond, meta)

    def _score_request(self, texts: list[str], start: int) -> list[dict[str, Any]]:
        """One prefill-only batch: the texts' prompt logprobs (with token texts) from token `start` on."""
        results = self.transport.generate({
            "text": texts,
            "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
            "return_text_in_logprobs": True,
        })  # fmt: skip
        assert isinstance(results, list) and len(results) == len(texts), "/generate answered a batch of the wrong size"
        return results

    def _choice_tokens_after_mark(self, text: str, mark_tokens: int, choices: list[str]) -> tuple[list[dict[str, Any]], list[list]] | None:
        """The common case, one request per choice and nothing recomputed but the choice and the
        text past the mark: logprobs from the first token after the mark's `mark_tokens` on. A
        choice's tokens are the last ones, whose texts spell exactly the choice; None when no run
        of last tokens does (the choice's first token merges with the prompt's last characters,
        or a token is part of a multi-byte character)."""
        for choice in choices:
            if not choice:
                raise ValueError(f"select(): the choice {choice!r} adds no token to the prompt")
        results = self._score_request([text + c for c in choices], mark_tokens)
        spans = []
        for choice, out in zip(choices, results):
            entries = out["meta_info"]["input_token_logprobs"]
            k, tail = len(entries), ""
            while k > 0 and len(tail) < len(choice):
                k -= 1
                piece = entries[k][2] if len(entries[k]) > 2 else None
                if not isinstance(piece, str):  # a server that does not send token texts
                    return None
                tail = piece + tail
            if tail != choice:
                return None
            spans.append(entries[k:])
        return results, spans

    def _choice_tokens_by_prompt_ids(self, text: str, mark_tokens: int, choices: list[str]) -> tuple[list[dict[str, Any]], list[list]]:
        """The general case: the prompt alone is scored with the choices, from the token before
        the mark, and a choice's tokens are those where prompt + choice stops matching the
        prompt's own tokens (so a token merged across the boundary counts as the choice's first)."""
        results = self._score_request([text] + [text + c for c in choices], max(mark_tokens - 1, 1))
        prompt_ids = [e[1] for e in results[0]["meta_info"]["input_token_logprobs"]]
        spans = []
        for choice, out in zip(choices, results[1:]):
            entries = out["meta_info"]["input_token_logprobs"]
            k = 0
            while k < min(len(prompt_ids), len(entries)) and entries[k][1] == prompt_ids[k]:
                k += 1
            if not entries[k:]:
                raise ValueError(f"select(): the choice {choice!r} adds no token to the prompt")
            spans.append(entries[k:])
        return results[1:], spans

    def _unconditional(self, token_ids: list[list[int]]) -> list[list[float | None]]:
        """logp of each choice token given only the choice's earlier tokens (the first: None)."""
        results = self.transport.generate({
            "input_ids": token_ids, "sampling_params": {"max_new_tokens": 0},
            "return_logprob": True, "logprob_start_len": 0,
        })  # fmt: skip
        assert isinstance(results, list)
        return [[e[0] for e in out["meta_info"]["input_token_logprobs"]] for out in results]

    def flush_cache(self) -> None:
        self.transport.flush_cache()

    def abort(self, rid: str) -> bool:
        return self.transport.abort(rid)

    def shutdown(self) -> None:
        self.transport.close()
