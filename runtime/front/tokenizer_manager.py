"""The front's request logic: validate and tokenize requests, fold the detokenized outputs into
their states, assemble their results.

Pure and process-agnostic: the async engine uses it behind HTTP and ZeroMQ, `LocalEngine` in the
caller's thread. Every user mistake raises `RequestError` (a ValueError) naming the input.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loom.runtime.messages import DecodeOptions, StrOut, TokenizedGenerateReq
from loom.runtime.protocol import GenerateItem, GenerateRequest, RequestError
from loom.runtime.sampling_params import SamplingParams


@dataclass
class ReqState:
    """What the front knows about one request while it runs."""

    rid: str
    prompt_tokens: int
    return_logprob: bool
    return_text_in_logprobs: bool
    created: float = field(default_factory=time.perf_counter)
    text: str = ""  # the detokenized text so far (stop strings held back)
    final_text: str | None = None  # the whole text, once finished (stop strings trimmed)
    output_ids: list[int] = field(default_factory=list)
    finished_reason: dict | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_time: float | None = None
    input_token_logprobs: list = field(default_factory=list)
    output_token_logprobs: list = field(default_factory=list)
    input_top_logprobs: list = field(default_factory=list)
    output_top_logprobs: list = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    @property
    def output_text(self) -> str:
        return self.final_text if self.final_text is not None else self.text


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TokenizerManager:
    def __init__(self, tokenizer: Any, *, context_len: int, vocab_size: int, max_total_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.max_total_tokens = max_total_tokens

    # ------------------------------------------------------------------ requests
    def tokenize(self, request: GenerateRequest, items: list[GenerateItem]) -> tuple[list[TokenizedGenerateReq], list[ReqState]]:
        """Validate and tokenize the items of one generate call -> (requests, states), in order.

        Raises RequestError naming the offending input before any request is created."""
        reqs: list[TokenizedGenerateReq] = []
        states: list[ReqState] = []
        encoded: dict[str, list[int]] = {}  # n samples of one prompt are tokenized once
        for item in items:
            where = item.where
            if item.text is not None:
                ids = encoded.get(item.text)
                if ids is None:
                    self._check_text_length(item.text, where)
                    ids = encoded[item.text] = self.tokenizer.encode(item.text, add_special_tokens=False)
            else:
                ids = item.input_ids or []
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise RequestError(f"{where} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})", "input_ids")
            field_name = where.partition("[")[0]
            if not ids:
                raise RequestError(f"{where} is empty: at least one token is needed", field_name)
            if len(ids) >= self.context_len:
                raise RequestError(
                    f"{where} has {len(ids)} tokens; the model's context length is {self.context_len} "
                    "(prompt tokens must leave room for at least one new token)", field_name
                )  # fmt: skip
            if len(ids) >= self.max_total_tokens:
                raise RequestError(
                    f"{where} has {len(ids)} tokens but the KV cache holds only {self.max_total_tokens}; "
                    "raise max_total_tokens or shorten the prompt", field_name
                )  # fmt: skip
            try:
                params = SamplingParams.from_dict(item.sampling_params)
            except RecursionError:  # json.loads of a json_schema string nested thousands deep
                raise RequestError("sampling_params.json_schema nests too deeply", "sampling_params.json_schema") from None
            params.validate(self.vocab_size)
            if item.sampling_params.get("max_new_tokens") is not None:
                self._check_room(len(ids), params.max_new_tokens, field_name)
            room = min(self.context_len, self.max_total_tokens) - len(ids)
            params.max_new_tokens = min(params.max_new_tokens, room)
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
            if not isinstance(item.return_logprob, bool):
                raise RequestError(f"return_logprob must be a bool, got {item.return_logprob!r}", "return_logprob")
            start = -1 if item.logprob_start_len is None else item.logprob_start_len
            if not _is_int(start) or start < -1:
                raise RequestError(f"logprob_start_len must be an int >= -1 (or None), got {item.logprob_start_len!r}", "logprob_start_len")
            top = item.top_logprobs_num
            if not _is_int(top) or not 0 <= top <= self.vocab_size:
                raise RequestError(f"top_logprobs_num must be an int in [0, {self.vocab_size}], got {top!r}", "top_logprobs_num")
            rid = item.rid if item.rid is not None else uuid.uuid4().hex
            if not isinstance(rid, str) or not rid:
                raise RequestError(f"rid must be a non-empty string, got {rid!r}", "rid")
            decode = DecodeOptions(params.skip_special_tokens, params.spaces_between_special_tokens, list(params.stop), params.no_stop_trim)
            reqs.append(TokenizedGenerateReq(rid, list(ids), params.to_dict(), item.return_logprob, start, top, request.stream, decode))
            states.append(ReqState(rid, len(ids), item.return_logprob, request.return_text_in_logprobs))
        return reqs, states

    def _check_text_length(self, text: str, where: str) -> None:
        """Refuse, before tokenizing it, a text that cannot fit in the context whatever its tokens:
        no token spells more than `longest_token` characters, so a text of more than `context_len`
        times that (doubled, for normalisers that drop characters) has more tokens than the context
        holds. Tokenizing a 16 MiB body would cost half a minute of CPU only to refuse it."""
        bound = self.context_len * 2 * self.longest_token
        if len(text) > bound:
            raise RequestError(
                f"{where} has {len(text)} characters, more than the model's context length of {self.context_len} tokens "
                f"can hold (at most {bound} characters)", where.partition("[")[0]
            )  # fmt: skip
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # half a surrogate pair ("\ud800"): the tokenizer would raise TypeError
            raise RequestError(f"{where} is not valid Unicode text: {exc.reason} at character {exc.start}",
                               where.partition("[")[0]) from None  # fmt: skip

    @functools.cached_property
    def longest_token(self) -> int:
        """The most characters one vocabulary entry spells (special tokens included; at least 16,
        for tokenizers without a vocabulary to read)."""
        get_vocab = getattr(self.tokenizer, "get_vocab", None)
        vocab = get_vocab() if get_vocab is not None else {}
        return max(16, max(map(len, vocab), default=0))

    def _check_room(self, prompt_tokens: int, max_new_tokens: int, prompt_name: str) -> None:
        """An explicit max_new_tokens must fit in the context after the prompt (as vLLM and SGLang
        refuse it): quietly capping 10**12 would make one request generate for minutes. Unset
        (or null) it means "until the context is full"."""
        total = prompt_tokens + max_new_tokens
        if total > self.context_len:
            raise RequestError(
                f"This model's maximum context length is {self.context_len} tokens. However, you requested {total} tokens "
                f"({prompt_tokens} in the {prompt_name}, {max_new_tokens} in the completion). "
                f"Please reduce the length of the {prompt_name} or completion.", "sampling_params.max_new_tokens"
            )  # fmt: skip
        if total > self.max_total_tokens:  # a KV pool smaller than the context: the request could never finish
            raise RequestError(
                f"The KV cache holds only {self.max_total_tokens} tokens (max_total_tokens). However, you requested {total} "
                f"tokens ({prompt_tokens} in the {prompt_name}, {max_new_tokens} in the completion). "
                f"Please reduce the length of the {prompt_name} or completion.", "sampling_params.max_new_tokens"
            )  # fmt: skip

    # ------------------------------------------------------------------ outputs
    def process_output(self, state: ReqState, out: StrOut) -> str:
        """Fold one detokenized scheduler output into the request's state -> the new text delta."""
        tokens = out.out
        if tokens.new_token_ids and state.first_token_time is None:
            state.first_token_time = time.perf_counter()
        state.output_ids.extend(tokens.new_token_ids)
        state.completion_tokens = tokens.completion_tokens
        state.cached_tokens = tokens.cached_tokens
        state.text += out.text_delta
        if out.final_text is not None:
            state.final_text = out.final_text
        if state.return_logprob:
            text = state.return_text_in_logprobs
            state.input_token_logprobs += [self._lp(e, text) for e in tokens.input_token_logprobs]
            state.output_token_logprobs += [self._lp(e, text) for e in tokens.output_token_logprobs]
            state.input_top_logprobs += [self._top(t, text) for t in tokens.input_top_logprobs]
            state.output_top_logprobs += [self._top(t, text) for t in tokens.output_top_logprobs]
        if tokens.finished_reason is not None:
            state.finished_reason = tokens.finished_reason
        return out.text_delta

    def _lp(self, entry: tuple[float | None, int], with_text: bool) -> tuple[float | None, int, str | None]:
        """(logprob, id) -> (logprob, id, text or None), SGLang's logprob entry."""
        logprob, token = entry
        return (logprob, token, self.tokenizer.decode([token]) if with_text else None)

    def _top(self, entries: list[tuple[float, int]] | None, with_text: bool) -> list | None:
        return None if entries is None else [self._lp(e, with_text) for e in entries]

    def result(self, state: ReqState) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": state.rid,
            "prompt_tokens": state.prompt_tokens,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
            "finish_reason": state.finished_reason,
            "e2e_latency": time.perf_counter() - state.created,
        }
        if state.return_logprob:
            meta["input_token_logprobs"] = state.input_token_logprobs
            meta["output_token_logprobs"] = state.output_token_logprobs
            meta["input_top_logprobs"] = state.input_top_logprobs
            meta["output_top_logprobs"] = state.output_top_logprobs
        return {"text": state.output_text, "output_ids": list(state.output_ids), "meta_info": meta}
