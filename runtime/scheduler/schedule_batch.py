"""A request as the scheduler sees it, and the batches built from requests each step.

Token bookkeeping of one request (all counts in tokens):

    fill_ids  = origin_input_ids + output_ids        tokens the request wants KV for
    prefix_len                                        leading slots owned by the radix tree
                                                      (locked through `last_node`)
    kv_len                                            tokens whose KV is in the request's row;
                                                      slots [prefix_len, kv_len) are held by it alone

During decode the newest output token has no KV yet: it is the next step's input. After a
jump-forward several do (`pending_len` > 1); the next step computes them together.

Overlap scheduling (`overlap.py`) launches a decode step before the previous one's token is back:
the step's KV slot is already counted in kv_len, its sampled id not yet in output_ids (`inflight`
such steps), so while inflight > 0, kv_len runs ahead of fill_ids by up to one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loom.runtime.constrained.grammar import Grammar
from loom.runtime.messages import DecodeOptions
from loom.runtime.model_executor.device import to_device
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from loom.runtime.sampling_params import SamplingParams

_EMPTY = torch.empty(0, dtype=torch.int64)


class Req:
    def __init__(
        self,
        rid: str,
        input_ids: list[int],
        sampling_params: SamplingParams,
        *,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        stream: bool = False,
        eos_token_ids: frozenset[int] = frozenset(),
        decode: DecodeOptions | None = None,
    ) -> None:
        self.rid = rid
        self.decode = decode  # the detokenizer's options, handed on with the first output (then None)
        self.sampling_params = sampling_params
        self.return_logprob = return_logprob
        # Prompt logprobs are wanted for prompt tokens [logprob_start_len, len(prompt)).
        self.logprob_start_len = len(input_ids) if (not return_logprob or logprob_start_len < 0) else min(logprob_start_len, len(input_ids))
        self.prompt_len = len(input_ids)
        # A prefill-only request (max_new_tokens == 0: scoring, cache warming) computes no KV for
        # its last prompt token: nothing comes after it, so only that token's logprob matters, and
        # it comes from the row before (the extend's last row, where sampling would be).
        self.held_out: int | None = None
        if sampling_params.max_new_tokens == 0 and len(input_ids) >= 2:
            self.held_out = input_ids[-1]
            input_ids = input_ids[:-1]
        self.origin_input_ids = input_ids
        self.top_logprobs_num = top_logprobs_num if return_logprob else 0
        self.stream = stream
        self.eos_token_ids = eos_token_ids
        self.stop_token_ids = frozenset(sampling_params.stop_token_ids)

        self.output_ids: list[int] = []
        self.finished_reason: dict[str, Any] | None = None
        # The request's grammar matcher (any backend's, constrained/grammar.py): its state has
        # accepted every output token, so a retracted request's re-prefill does not feed it again.
        self.grammar: Grammar | None = None

        # KV state
        self.req_pool_idx: int | None = None
        self.prefix_indices: torch.Tensor = _EMPTY
        self.last_node: Any = None  # the prefix cache's handle (MatchResult.last_node); locked once admitted
        self.kv_len = 0
        self.extend_input_len = 0  # new tokens computed by the current extend step
        # Overlap scheduling: launched decode steps whose sampled id is not in output_ids yet, and
        # the future ref (FutureTokenMap) of the newest one's id, the next step's input.
        self.inflight = 0
        self.future_ref = 0
        self.is_chunked = False  # the current extend does not reach the end of fill_ids

        # Accounting reported to the user
        self.cached_tokens = 0
        self.admitted_once = False
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed)

        # Logprobs not yet sent (deltas) and how far prompt logprobs got
        self.input_logprob_pos = self.logprob_start_len  # next prompt token whose logprob is due
        self.pending_input_logprobs: list[tuple[float | None, int]] = []
        self.pending_input_top: list[list[tuple[float, int]] | None] = []
        self.pending_output_logprobs: list[tuple[float, int]] = []
        self.pending_output_top: list[list[tuple[float, int]]] = []
        self.sent_output_len = 0

    # ------------------------------------------------------------------ views
    @property
    def fill_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def fill_len(self) -> int:
        """len(fill_ids), without building the list."""
        return len(self.origin_input_ids) + len(self.output_ids)

    def token_at(self, pos: int) -> int:
        """fill_ids[pos], without building the list."""
        n = len(self.origin_input_ids)
        return self.origin_input_ids[pos] if pos < n else self.output_ids[pos - n]

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_indices.numel())

    @property
    def pending_len(self) -> int:
        """Tokens of fill_ids without KV: the next step's input (1 in decode, more after a jump-forward)."""
        return self.fill_len - self.kv_len

    @property
    def remaining_new_tokens(self) -> int:
        return max(self.sampling_params.max_new_tokens - len(self.output_ids), 0)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    def wants_input_logprobs(self) -> bool:
        return self.input_logprob_pos < len(self.origin_input_ids)

    def wants_last_row(self) -> bool:
        """Whether the extend that reaches the end of fill_ids needs its last row's logits: to
        sample the next token, or for the held-out prompt token's logprob."""
        if self.held_out is not None:
            return self.logprob_start_len < self.prompt_len
        return self.remaining_new_tokens > 0

    def max_prefix_len(self) -> int:
        """Longest prefix that may come from the cache: keep >= 1 token to compute, and recompute
        every prompt position whose logits are needed for prompt logprobs."""
        limit = self.fill_len - 1
        if self.wants_input_logprobs():
            limit = min(limit, max(self.input_logprob_pos - 1, 0))
        return max(limit, 0)

    def reset_for_retract(self) -> None:
        self.req_pool_idx = None
        self.prefix_indices = _EMPTY
        self.last_node = None
        self.kv_len = 0
        self.extend_input_len = 0
        self.is_chunked = False

    def __repr__(self) -> str:
        return f"Req(rid={self.rid!r}, prompt={len(self.origin_input_ids)}, out={len(self.output_ids)})"


@dataclass(slots=True)
class ExtendPlan:
    """An extend batch plus where the logits rows of each request sit in its flattened tokens."""

    reqs: list[Req]
    forward_batch: ForwardBatch
    # For each request: the global token rows whose logits are needed, and the positions (in
    # fill_ids) of the tokens those rows predict.
    logit_rows: list[int]
    row_owner: list[tuple[int, int]]  # (request index, position in fill_ids of the token the row predicts)


def host_to_device(values: list[int], device: torch.device | None) -> torch.Tensor:
    """An int64 tensor of `values` on `device` (`to_device`), left on the host when no device is given."""
    t = torch.tensor(values, dtype=torch.int64)
    return t if device is None else to_device(t, device)


def build_extend_batch(
    reqs: list[Req],
    out_cache_loc: torch.Tensor,
    req_to_token: torch.Tensor,
    *,
    from_kv_len: bool = False,
    device: torch.device | None = None,
) -> ExtendPlan:
    """Flatten the new tokens of `reqs` (each has prefix_indices, req_pool_idx, extend_input_len set)
    into one EXTEND ForwardBatch and write their slots into the req_to_token rows.

    from_kv_len: running requests instead (a decode step after a jump-forward): each extends its
    row from kv_len over its pending tokens; the row already holds the slots before kv_len."""
    input_ids: list[int] = []
    positions: list[int] = []
    prefix_lens: list[int] = []
    extend_lens: list[int] = []
    logit_rows: list[int] = []
    row_owner: list[tuple[int, int]] = []
    offset = 0
    for i, req in enumerate(reqs):
        start, n = (req.kv_len, req.pending_len) if from_kv_len else (req.prefix_len, req.extend_input_len)
        fill = req.fill_ids
        input_ids.extend(fill[start : start + n])
        positions.extend(range(start, start + n))
        prefix_lens.append(start)
        extend_lens.append(n)
        row = req_to_token[req.req_pool_idx]
        if not from_kv_len:
            row[:start] = req.prefix_indices
        row[start : start + n] = out_cache_loc[offset : offset + n]
        end = start + n  # tokens with KV after this step
        # Rows for prompt logprobs: position p predicts token p + 1.
        if req.wants_input_logprobs():
            first = max(req.input_logprob_pos - 1, start)
            last = min(end, len(req.origin_input_ids) - 1)
            for p in range(first, last):
                logit_rows.append(offset + p - start)
                row_owner.append((i, p + 1))
        # Row for sampling the next token: the last one, when this extend reaches the end.
        if not req.is_chunked and (from_kv_len or req.wants_last_row()):
            logit_rows.append(offset + n - 1)
            row_owner.append((i, end))
        offset += n
    seq_lens = [p + n for p, n in zip(prefix_lens, extend_lens)]
    fb = ForwardBatch(
        mode=ForwardMode.EXTEND,
        batch_size=len(reqs),
        input_ids=host_to_device(input_ids, device),
        positions=host_to_device(positions, device),
        out_cache_loc=out_cache_loc,
        req_pool_indices=host_to_device([r.req_pool_idx for r in reqs], device),
        seq_lens=host_to_device(seq_lens, device),
        seq_lens_cpu=seq_lens,
        extend_prefix_lens_cpu=prefix_lens,
        extend_seq_lens_cpu=extend_lens,
    )
    return ExtendPlan(reqs, fb, logit_rows, row_owner)


def build_decode_batch(
    reqs: list[Req],
    out_cache_loc: torch.Tensor,
    req_to_token: torch.Tensor,
    *,
    input_ids: list[int] | None = None,
    device: torch.device | None = None,
) -> ForwardBatch:
    """One new token per request: the newest output token (or input_ids[i], e.g. a future ref),
    stored at position kv_len. device: as in `build_extend_batch`."""
    kv_lens = [r.kv_len for r in reqs]
    pool_idx = host_to_device([r.req_pool_idx for r in reqs], device)
    positions = host_to_device(kv_lens, device)
    req_to_token[pool_idx, positions] = out_cache_loc
    if input_ids is None:
        input_ids = [r.output_ids[-1] for r in reqs]
    seq_lens = [n + 1 for n in kv_lens]
    return ForwardBatch(
        mode=ForwardMode.DECODE,
        batch_size=len(reqs),
        input_ids=host_to_device(input_ids, device),
        positions=positions,
        out_cache_loc=out_cache_loc,
        req_pool_indices=pool_idx,
        seq_lens=host_to_device(seq_lens, device),
        seq_lens_cpu=seq_lens,
    )
