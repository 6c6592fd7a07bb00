"""Engine-internal messages between the front (tokenizer manager), the scheduler and the detokenizer.

Plain dataclasses with msgpack-able fields only (no torch), sent over ZeroMQ unchanged (`ipc.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class DecodeOptions:
    """How the detokenizer turns one request's tokens into text. They travel with the request to
    the scheduler, which hands them on with the request's first output (`TokenIDOut.decode`)."""

    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    no_stop_trim: bool = False


@dataclass(slots=True)
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]  # SamplingParams.to_dict(); validated by the front
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs; k >= 0: logprobs of prompt tokens k..end
    top_logprobs_num: int = 0
    stream: bool = False
    decode: DecodeOptions = field(default_factory=DecodeOptions)


@dataclass(slots=True)
class AbortReq:
    rid: str
    message: str = "aborted by the client"


@dataclass(slots=True)
class FlushCacheReq:
    pass


@dataclass(slots=True)
class FlushCacheOut:
    success: bool
    message: str = ""


@dataclass(slots=True)
class TokenIDOut:
    """What one request produced in one scheduler step (deltas since the last message)."""

    rid: str
    new_token_ids: list[int]
    finished_reason: dict[str, Any] | None  # {"type": "stop"|"length"|"abort", "matched": ..., "message": ...}
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Each entry is (logprob or None, token_id); the front adds the text when asked.
    input_token_logprobs: list[tuple[float | None, int]] = field(default_factory=list)
    output_token_logprobs: list[tuple[float, int]] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]] | None] = field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    decode: DecodeOptions | None = None  # the request's, on its first output only


@dataclass(slots=True)
class BatchTokenIDOut:
    outputs: list[TokenIDOut]


# ---------------------------------------------------------------------- serving (processes)
@dataclass(slots=True)
class SchedulerReady:
    """Scheduler -> (detokenizer) -> front, once the model is loaded: the front answers only then."""

    context_len: int
    vocab_size: int
    max_total_tokens: int


@dataclass(slots=True)
class StrOut:
    """One request's scheduler output with its text: the new visible delta, and the final text once
    the request finished."""

    out: TokenIDOut
    text_delta: str
    final_text: str | None = None


@dataclass(slots=True)
class BatchStrOut:
    outputs: list[StrOut]


@dataclass(slots=True)
class SchedulerInfoReq:
    pass


@dataclass(slots=True)
class SchedulerInfoOut:
    memory: dict[str, int]
    stats: dict[str, int]
    running: int
    waiting: int


# Every message that crosses a socket, by the name the wire carries (`ipc.encode` / `decode`).
MESSAGE_TYPES: dict[str, type] = {
    cls.__name__: cls
    for cls in (TokenizedGenerateReq, AbortReq, FlushCacheReq, FlushCacheOut, TokenIDOut, BatchTokenIDOut, SchedulerReady,
                StrOut, BatchStrOut, SchedulerInfoReq, SchedulerInfoOut)
}  # fmt: skip
