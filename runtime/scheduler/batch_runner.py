"""Running a batch: the forward pass of an extend (prefill) or decode batch, the logits
processing (penalties, grammar masks, logprobs) and sampling, and handing each request its
tokens (`output.py`).

Each step the rows with a grammar get a packed bitmask (`_grammar_mask`) applied to their logits
before sampling; batches without grammars skip it. On the CPU a decode row whose grammar allows
few tokens at this step (`_sparse_rows`: at most 1/SPARSE_LOGITS_SHARE of the vocabulary) gets
logits for those tokens only and no bitmask (`ModelRunner.compute_logits_sparse`). Prefill-only
requests (`max_new_tokens` 0) hold out their last prompt token (`Req.held_out`): it gets no KV,
and its logprob comes from the extend's last row, where sampling would be.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from loom.runtime.constrained import allocate_token_bitmask
from loom.runtime.model_executor.cpu_decode import MAX_ROWS as FUSED_MAX_ROWS
from loom.runtime.model_executor.sampling import (
    SamplingBatchInfo,
    compute_logprobs,
    gather_top_logprobs,
    plain_argmax,
    sample,
)
from loom.runtime.scheduler.schedule_batch import ExtendPlan, Req, build_decode_batch, build_extend_batch

logger = logging.getLogger(__name__)

SPARSE_LOGITS_SHARE = 16  # a grammar row allowing at most V / 16 tokens gets logits for those only (CPU)


class BatchRunner:
    """The Scheduler's batch execution and sampling (a mixin over the scheduler's state)."""

    def _guarded(self, reqs: list[Req], out_cache_loc: torch.Tensor, fn: Callable[[], None]) -> None:
        """A failing batch aborts its own requests with the error; the scheduler keeps serving.

        The batch's new slots (`out_cache_loc`) are freed: the failed step's KV is never cached."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported to every request of the batch
            logger.exception("batch of %d requests failed", len(reqs))
            self.allocator.free(out_cache_loc)
            for req in reqs:
                # A newly admitted request's row holds just its cached prefix.
                req.kv_len = max(req.kv_len, req.prefix_len)
                if not req.finished:
                    self.finish(req, {"type": "abort", "message": f"internal error: {type(exc).__name__}: {exc}"})
            self.running = [r for r in self.running if not r.finished]
            if self.chunked_req is not None and self.chunked_req.finished:
                self.chunked_req = None

    def run_extend(self, plan: ExtendPlan) -> None:
        hidden = self.runner.forward(plan.forward_batch)
        sample_rows: list[int] = []
        sample_reqs: list[Req] = []
        logits = None
        if plan.logit_rows:
            logits = self.runner.compute_logits(hidden[plan.logit_rows], self.logits_scratch)  # [N, V]
        logprobs = None
        if logits is not None and any(r.return_logprob for r in plan.reqs):
            logprobs = compute_logprobs(logits, self.logprobs_scratch.get(*logits.shape, logits.device))
        prompt_rows: list[tuple[int, Req, int]] = []  # (row, request, prompt token whose logprob it gives)
        for row, (i, pos) in enumerate(plan.row_owner):
            req = plan.reqs[i]
            if pos < len(req.origin_input_ids) and req.wants_input_logprobs() and pos == req.input_logprob_pos:
                prompt_rows.append((row, req, req.origin_input_ids[pos]))
                req.input_logprob_pos += 1
            elif pos == req.fill_len and not req.is_chunked and req.held_out is not None:
                prompt_rows.append((row, req, req.held_out))  # wants_last_row: its logprob was asked for
            elif pos == req.fill_len and not req.is_chunked and req.remaining_new_tokens > 0:
                sample_rows.append(row)
                sample_reqs.append(req)
        if prompt_rows:
            self._record_input_logprobs(logprobs, prompt_rows)

        next_ids = self._sample(logits, logprobs, sample_rows, sample_reqs)
        sampled = dict(zip(map(id, sample_reqs), next_ids))

        for req in plan.reqs:
            req.kv_len = req.prefix_len + req.extend_input_len
            self._cache_progress(req)
            if req.is_chunked:
                self.chunked_req = req
                continue
            if self.chunked_req is req:
                self.chunked_req = None
            token = sampled.get(id(req))
            if token is None:  # max_new_tokens == 0: prefill only
                self.finish(req, {"type": "length", "length": 0})
                continue
            self._append_token(req, token)
            if req.finished:
                continue
            self.running.append(req)

    @staticmethod
    def _record_input_logprobs(logprobs: torch.Tensor, prompt_rows: list[tuple[int, Req, int]]) -> None:
        """Prompt logprobs (and top logprobs where asked) of (row, request, token) triples, in
        order: one gather and one top-k for the whole step, not one device read per row."""
        rows = torch.tensor([r for r, _, _ in prompt_rows], dtype=torch.int64, device=logprobs.device)
        tokens = torch.tensor([t for _, _, t in prompt_rows], dtype=torch.int64, device=logprobs.device)
        values = logprobs[rows, tokens].tolist()
        top_at = [j for j, (_, req, _) in enumerate(prompt_rows) if req.top_logprobs_num]
        tops = gather_top_logprobs(logprobs[rows[top_at]], [prompt_rows[j][1].top_logprobs_num for j in top_at]) if top_at else []
        top_of = dict(zip(top_at, tops))
        for j, ((_, req, token), value) in enumerate(zip(prompt_rows, values)):
            req.pending_input_logprobs.append((value, token))
            if req.top_logprobs_num:
                req.pending_input_top.append(top_of[j])

    def run_decode(self, reqs: list[Req], out_cache_loc: torch.Tensor) -> None:
        """One decode step of `reqs`; out_cache_loc holds `decode_slots(reqs)` new KV slots."""
        req_to_token = self.req_to_token_pool.req_to_token
        catch_up = self.catches_up(reqs)
        if catch_up or all(r.pending_len == 1 for r in reqs):
            input_ids = [r.token_at(r.kv_len) for r in reqs] if catch_up else None
            fb = build_decode_batch(reqs, out_cache_loc, req_to_token, input_ids=input_ids, device=self.batch_device)
            hidden = self.runner.forward(fb)  # [B, H]
        else:  # jump-forwarded tokens: compute them all in this step, as an extend
            plan = build_extend_batch(reqs, out_cache_loc, req_to_token, from_kv_len=True, device=self.batch_device)
            hidden = self.runner.forward(plan.forward_batch)[plan.logit_rows]  # [B, H]
        behind: list[Req] = []  # rows with more jump-forwarded tokens to compute: they sample later
        if catch_up:
            rows = [i for i, r in enumerate(reqs) if r.pending_len == 1]
            behind = [r for r in reqs if r.pending_len > 1]
            reqs = [reqs[i] for i in rows]
            hidden = hidden[rows]
        if reqs:
            self._decode_sample(reqs, hidden)
        for req in behind:
            req.kv_len += 1
        self.running = [r for r in self.running if not r.finished]

    def _decode_sample(self, reqs: list[Req], hidden: torch.Tensor) -> None:
        """Logits, sampling and the new token of each of `reqs` (hidden: [B, H], one row each)."""
        sparse = self._sparse_rows(reqs)
        if sparse:  # rows whose grammar allows few tokens: logits for those only, already masked
            logits = self.runner.compute_logits_sparse(hidden, [sparse.get(i) for i in range(len(reqs))])
        else:
            logits = self.runner.compute_logits(hidden)  # [B, V]
        logprobs = compute_logprobs(logits) if any(r.return_logprob for r in reqs) else None
        next_ids = self._sample(logits, logprobs, list(range(len(reqs))), reqs, premasked=frozenset(sparse))
        for req, token in zip(reqs, next_ids):
            req.kv_len += req.pending_len
            self._append_token(req, token)

    def catches_up(self, reqs: list[Req]) -> bool:
        """Whether this decode step computes one token per row although a jump-forward left some
        rows several (`Req.pending_len` > 1): those rows compute their next pending token and sample
        nothing, the others decode as usual, and the step stays one fused call (on the CPU, where
        `cpu_decode` takes the batch). Elsewhere such a step is one extend over every pending token.

        Why: the extend goes op by op through the torch path, about 3x a fused 16-row decode call,
        and a row's forced tokens cost a fused call each either way; caught up one per step, they
        ride along with the other rows' decoding instead of adding calls for the whole batch. Each
        row's tokens and KV are the same: the fused step attends each row alone."""
        fused = self.runner.cpu_decode
        return fused is not None and len(reqs) <= FUSED_MAX_ROWS and any(r.pending_len > 1 for r in reqs)

    def decode_slots(self, reqs: list[Req]) -> int:
        """New KV slots the decode step of `reqs` takes (see `catches_up`)."""
        return len(reqs) if self.catches_up(reqs) else sum(r.pending_len for r in reqs)

    def _sparse_rows(self, reqs: list[Req]) -> dict[int, torch.Tensor]:
        """Decode rows whose grammar allows at most 1/SPARSE_LOGITS_SHARE of the vocabulary here (an
        integer's digits, an enum, the punctuation after a value) -> those token ids. On the CPU
        the LM head is a sixth of a decode step; such a row needs only a few of its dot products.
        Rows that return logprobs need the whole distribution and stay dense."""
        if not self.runner.can_compute_sparse_logits:
            return {}
        limit = self.runner.vocab_size // SPARSE_LOGITS_SHARE
        out: dict[int, torch.Tensor] = {}
        for i, req in enumerate(reqs):
            if req.grammar is None or req.return_logprob:
                continue
            ids = req.grammar.allowed_ids(limit)  # None: the backend cannot list them cheaply
            if ids is not None and ids.numel():
                out[i] = ids
        return out

    def _sample(self, logits, logprobs, rows: list[int], reqs: list[Req], premasked: frozenset[int] = frozenset()) -> list[int]:
        """Sample one token for each of `rows` (rows of `logits`, the requests `reqs`). Grammar
        rows are masked here, except those in `premasked` (indices into `reqs`), whose logits
        hold -inf outside their grammar's tokens already."""
        if not rows:
            return []
        if len(rows) != logits.shape[0]:
            logits = logits.index_select(0, torch.tensor(rows, dtype=torch.int64))
        params = [r.sampling_params for r in reqs]
        banned = [self._banned_ids(r) for r in reqs]
        if not any(banned) and all(r.grammar is None for r in reqs) and plain_argmax(params):
            next_ids = torch.argmax(logits, dim=-1).tolist()  # what `sample` gives, without building its state
        else:
            info = SamplingBatchInfo.from_params(
                params,
                output_ids=[r.output_ids for r in reqs],
                prompt_ids=[r.origin_input_ids for r in reqs],
                vocab_size=logits.shape[-1],
                device=logits.device,
                generators=[r.generator for r in reqs],
                banned_ids=banned,
            )
            if any(r.grammar is not None and i not in premasked for i, r in enumerate(reqs)):
                info.vocab_mask = self._grammar_mask(reqs, logits.shape[-1], premasked)
            next_ids = sample(logits, info).tolist()
        if logprobs is not None:
            for row, req, token in zip(rows, reqs, next_ids):
                if req.return_logprob:
                    req.pending_output_logprobs.append((float(logprobs[row, token]), token))
                    if req.top_logprobs_num:
                        req.pending_output_top.append(gather_top_logprobs(logprobs[row : row + 1], [req.top_logprobs_num])[0])
        return next_ids

    @staticmethod
    def _grammar_mask(reqs: list[Req], vocab_size: int, skip: frozenset[int] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed bitmask [G, ceil(V / 32)] int32, the G batch rows it belongs to) for the rows
        with a grammar, but those in `skip`."""
        rows = [i for i, r in enumerate(reqs) if r.grammar is not None and i not in skip]
        bitmask = allocate_token_bitmask(len(rows), vocab_size)
        for j, i in enumerate(rows):
            reqs[i].grammar.fill_mask(bitmask[j])
        return bitmask, torch.tensor(rows, dtype=torch.int64)

    def _banned_ids(self, req: Req, n_out: int | None = None) -> list[int]:
        """Token ids the request may not sample as output number n_out + 1 (default: the next one)."""
        n_out = len(req.output_ids) if n_out is None else n_out
        if n_out >= req.sampling_params.min_new_tokens:
            return []
        banned = set(req.stop_token_ids)
        if not req.sampling_params.ignore_eos:
            banned |= req.eos_token_ids
        return sorted(banned)

    def _cache_progress(self, req: Req) -> None:
        """Share the request's computed tokens through the radix tree (so waiting requests and
        the next chunk reuse them); the tree then owns and protects those slots."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        tokens = req.fill_ids[: req.kv_len]
        new_indices, new_node = self.tree_cache.cache_unfinished(tokens, row[: req.kv_len].clone(), req.prefix_len, req.last_node)
        row[: new_indices.numel()] = new_indices
        req.prefix_indices, req.last_node = new_indices, new_node
