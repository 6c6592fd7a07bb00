"""Engine-internal messages between the front (tokenizer manager), the scheduler and the detokenizer.

Plain dataclasses with msgpack-able fields only (no torch): the serving issue sends them over
ZeroMQ unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TokenizedGenerateReq:
    rid: str
    input_ids: list[int]
    sampling_params: dict[str, Any]  # SamplingParams.to_dict(); validated by the front
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs; k >= 0: logprobs of prompt tokens k..end
    top_logprobs_num: int = 0
    stream: bool = False


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


@dataclass(slots=True)
class BatchTokenIDOut:
    outputs: list[TokenIDOut]
