"""The front's request logic: validate and tokenize requests, assemble their results.

Pure and process-agnostic: `loom.Engine` uses it in-process; the serving issue puts it behind
HTTP and ZeroMQ unchanged. Every user mistake raises `ValueError` naming the input.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from loom.runtime.detokenizer.decode_state import DecodeState
from loom.runtime.messages import TokenIDOut, TokenizedGenerateReq
from loom.runtime.sampling_params import SamplingParams


@dataclass
class ReqState:
    """What the front knows about one request while it runs."""

    rid: str
    prompt_tokens: int
    decode: DecodeState
    return_logprob: bool
    return_text_in_logprobs: bool
    created: float = field(default_factory=time.perf_counter)
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


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class TokenizerManager:
    def __init__(self, tokenizer: Any, *, context_len: int, vocab_size: int, max_total_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.context_len = context_len
        self.vocab_size = vocab_size
        self.max_total_tokens = max_total_tokens

    # ------------------------------------------------------------------ requests
    def tokenize_batch(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: dict | list[dict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
        *,
        return_logprob: bool | list[bool] = False,
        logprob_start_len: int | list[int] | None = None,
        top_logprobs_num: int | list[int] = 0,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        rid: str | list[str] | None = None,
    ) -> tuple[list[TokenizedGenerateReq], list[ReqState], bool]:
        """Validate a (possibly batched) generate call -> (requests, states, is_batch).

        Raises ValueError naming the offending input before any request is created."""
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of `prompt` (text) or `input_ids` (token ids)")
        if prompt is not None:
            is_batch = isinstance(prompt, list)
            prompts = prompt if is_batch else [prompt]
            name = "prompt"
            if is_batch and not prompts:
                raise ValueError("prompt must be a non-empty string or a non-empty list of strings, got []")
            for i, p in enumerate(prompts):
                if not isinstance(p, str):
                    raise ValueError(f"{self._at(name, i, is_batch)} must be a string, got {type(p).__name__}")
            ids_list = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        else:
            is_batch = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
            ids_list = input_ids if is_batch else [input_ids]
            name = "input_ids"
            if not isinstance(input_ids, list):
                raise ValueError(f"input_ids must be a list of token ids, got {type(input_ids).__name__}")
            for i, ids in enumerate(ids_list):
                where = self._at(name, i, is_batch)
                if not isinstance(ids, list) or not all(_is_int(t) for t in ids):
                    raise ValueError(f"{where} must be a list of ints")
                bad = [t for t in ids if not 0 <= t < self.vocab_size]
                if bad:
                    raise ValueError(f"{where} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
        n = len(ids_list)
        params_list = self._per_request("sampling_params", sampling_params, n, is_batch, default=None)
        lp_flags = self._per_request("return_logprob", return_logprob, n, is_batch, default=False)
        lp_starts = self._per_request("logprob_start_len", logprob_start_len, n, is_batch, default=None)
        top_nums = self._per_request("top_logprobs_num", top_logprobs_num, n, is_batch, default=0)
        rids = self._per_request("rid", rid, n, is_batch, default=None)

        reqs: list[TokenizedGenerateReq] = []
        states: list[ReqState] = []
        for i, ids in enumerate(ids_list):
            where = self._at(name, i, is_batch)
            if not ids:
                raise ValueError(f"{where} is empty: at least one token is needed")
            if len(ids) >= self.context_len:
                raise ValueError(
                    f"{where} has {len(ids)} tokens; the model's context length is {self.context_len} "
                    "(prompt tokens must leave room for at least one new token)"
                )
            if len(ids) >= self.max_total_tokens:
                raise ValueError(
                    f"{where} has {len(ids)} tokens but the KV cache holds only {self.max_total_tokens}; "
                    "raise max_total_tokens or shorten the prompt"
                )
            params = SamplingParams.from_dict(params_list[i])
            params.validate(self.vocab_size)
            room = min(self.context_len, self.max_total_tokens) - len(ids)
            params.max_new_tokens = min(params.max_new_tokens, room)
            params.min_new_tokens = min(params.min_new_tokens, params.max_new_tokens)
            if not isinstance(lp_flags[i], bool):
                raise ValueError(f"return_logprob must be a bool, got {lp_flags[i]!r}")
            start = -1 if lp_starts[i] is None else lp_starts[i]
            if not _is_int(start) or start < -1:
                raise ValueError(f"logprob_start_len must be an int >= -1 (or None), got {lp_starts[i]!r}")
            top = top_nums[i]
            if not _is_int(top) or not 0 <= top <= self.vocab_size:
                raise ValueError(f"top_logprobs_num must be an int in [0, {self.vocab_size}], got {top!r}")
            req_id = rids[i] if rids[i] is not None else uuid.uuid4().hex
            if not isinstance(req_id, str) or not req_id:
                raise ValueError(f"rid must be a non-empty string, got {req_id!r}")
            reqs.append(
                TokenizedGenerateReq(
                    rid=req_id,
                    input_ids=list(ids),
                    sampling_params=params.to_dict(),
                    return_logprob=lp_flags[i],
                    logprob_start_len=start,
                    top_logprobs_num=top,
                    stream=stream,
                )
            )
            states.append(
                ReqState(
                    rid=req_id,
                    prompt_tokens=len(ids),
                    decode=DecodeState(
                        self.tokenizer,
                        skip_special_tokens=params.skip_special_tokens,
                        spaces_between_special_tokens=params.spaces_between_special_tokens,
                        stop=params.stop,
                        no_stop_trim=params.no_stop_trim,
                    ),
                    return_logprob=lp_flags[i],
                    return_text_in_logprobs=return_text_in_logprobs,
                )
            )
        return reqs, states, is_batch

    @staticmethod
    def _at(name: str, i: int, is_batch: bool) -> str:
        return f"{name}[{i}]" if is_batch else name

    @staticmethod
    def _per_request(name: str, value: Any, n: int, is_batch: bool, default: Any) -> list[Any]:
        """A scalar (or one dict of sampling params) applies to every request; a list gives one
        entry per request."""
        if value is None:
            return [default] * n
        if not isinstance(value, list):
            return [value] * n
        if not is_batch and name != "sampling_params":
            raise ValueError(f"{name} must be a single value for a single prompt, got a list")
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but there are {n} prompts")
        return list(value)

    # ------------------------------------------------------------------ outputs
    def process_output(self, state: ReqState, out: TokenIDOut) -> str:
        """Fold one scheduler message into the request's state -> the new text delta."""
        if out.new_token_ids and state.first_token_time is None:
            state.first_token_time = time.perf_counter()
        state.output_ids.extend(out.new_token_ids)
        state.completion_tokens = out.completion_tokens
        state.cached_tokens = out.cached_tokens
        state.decode.feed(out.new_token_ids)
        if state.return_logprob:
            text = state.return_text_in_logprobs
            state.input_token_logprobs += [self._lp(e, text) for e in out.input_token_logprobs]
            state.output_token_logprobs += [self._lp(e, text) for e in out.output_token_logprobs]
            state.input_top_logprobs += [self._top(t, text) for t in out.input_top_logprobs]
            state.output_top_logprobs += [self._top(t, text) for t in out.output_top_logprobs]
        if out.finished_reason is not None:
            state.finished_reason = out.finished_reason
            state.decode.finish(out.finished_reason)
        return state.decode.take_delta()

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
        return {"text": state.decode.output_text, "output_ids": list(state.output_ids), "meta_info": meta}
