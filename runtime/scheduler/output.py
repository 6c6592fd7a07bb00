"""Output processing: a request's new token is appended, fed to its grammar, checked against the
stop conditions, jumped forward over grammar-forced text, and sent on (`TokenIDOut`, batched per
step); a finished request inserts its tokens into the radix cache and releases its memory.

Jump-forward (`constrained/jump_forward.py`, off with `disable_jump_forward`): when, after a
sampled token, the grammar forces a string, the request's last unsent token is backed off and
replaced by the canonical tokenization of it + the forced string. Those tokens have no KV yet;
the next decode step computes them all at once, as an extend from each request's `kv_len`.
"""

from __future__ import annotations

from loom.runtime.constrained.jump_forward import MAX_BACKOFF, plan_jump_forward
from loom.runtime.messages import (
    BatchTokenIDOut,
    TokenIDOut,
)
from loom.runtime.scheduler.schedule_batch import Req


class OutputProcessor:
    """The Scheduler's output processing (a mixin over the scheduler's state)."""

    def _append_token(self, req: Req, token: int) -> None:
        req.output_ids.append(token)
        self.stats["generated_tokens"] += 1
        if req.grammar is not None and not req.grammar.accept_token(token):
            self.finish(req, {"type": "abort", "message": f"internal error: sampled token {token} is not allowed by the grammar"})
            return
        reason = self._check_finished(req, token)
        if reason is None and req.grammar is not None and self.jump_forward and self._jump_forward(req):
            reason = self._check_finished(req, req.output_ids[-1])
        if reason is None and req.grammar is not None and req.grammar.is_terminated():
            reason = {"type": "stop", "matched": token if token in req.eos_token_ids else None}
        if reason is not None:
            self.finish(req, reason)
        elif req.stream:
            self._emit(req)

    def _jump_forward(self, req: Req) -> bool:
        """Append the string the grammar forces, canonically tokenized (see `jump_forward.py`).

        Only tokens not yet sent to the client are backed off, so streamed text never changes
        (the detokenizer needs no rollback), and only those whose KV the request holds alone, so
        no radix-tree node is touched. Skipped for requests that want logprobs (the forced tokens
        were never sampled: a logprob for them would be made up) and for stop strings / stop
        tokens (checked per sampled token; a forced string is not scanned for them)."""
        params = req.sampling_params
        if req.return_logprob or params.stop or params.stop_token_ids:
            return False
        n_fill = req.fill_len
        backoff = min(MAX_BACKOFF, len(req.output_ids) - req.sent_output_len, n_fill - req.prefix_len)
        max_new = min(req.remaining_new_tokens, self.runner.context_len - 1 - n_fill)
        if max_new <= 0:
            return False
        assert self.tokenize is not None
        # fill_ids[-(backoff + 1):] without copying the prompt (backoff <= len(output_ids))
        out = req.output_ids
        recent = out[len(out) - backoff - 1 :] if backoff < len(out) else req.origin_input_ids[-1:] + out
        jump = plan_jump_forward(req.grammar, recent, backoff, max_new, self.decode_tail, self.tokenize)
        if jump is None:
            return False
        if jump.backoff:
            # Backed-off tokens that already have KV give their slots back; the step recomputes them.
            start = n_fill - jump.backoff
            if start < req.kv_len:
                row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
                self.allocator.free(row[start : req.kv_len].clone())
                req.kv_len = start
            del req.output_ids[-jump.backoff :]
        req.output_ids.extend(jump.new_ids)
        self.stats["jump_forwards"] += 1
        self.stats["jump_forward_tokens"] += jump.gain
        self.stats["generated_tokens"] += jump.gain
        return True

    def _check_finished(self, req: Req, token: int) -> dict | None:
        params = req.sampling_params
        n_out = len(req.output_ids)
        if n_out >= params.min_new_tokens:
            if token in req.stop_token_ids or (not params.ignore_eos and token in req.eos_token_ids):
                return {"type": "stop", "matched": token}
            if params.stop:
                longest = max(len(s.encode()) for s in params.stop)
                tail = self.decode_tail(req.output_ids[-(longest + 2) :])
                for stop in params.stop:
                    if stop in tail:
                        return {"type": "stop", "matched": stop}
        return self._length_reason(req, n_out)

    def _length_reason(self, req: Req, n_out: int) -> dict | None:
        """The finish reason of a request with n_out output tokens that reached its length limit
        (max_new_tokens or the model's context), else None."""
        if n_out >= req.sampling_params.max_new_tokens:
            return {"type": "length", "length": req.sampling_params.max_new_tokens}
        if len(req.origin_input_ids) + n_out >= self.runner.context_len:
            return {"type": "length", "length": n_out, "message": "reached the model's context length"}
        return None

    def finish(self, req: Req, reason: dict) -> None:
        req.finished_reason = reason
        if req.req_pool_idx is not None:
            self.release(req, cache=True)
        self._emit(req)

    def release(self, req: Req, cache: bool) -> None:
        """Give back the request's KV: with cache=True its tokens go to the prefix cache
        (`cache_finished`), otherwise (retraction) the slots it alone holds are freed and its
        prefix unlocked here (see `PrefixCache` for who frees what)."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx]
        owned = req.prefix_len if self.tree_cache.shares_prefixes else 0  # slots [0, owned) are the cache's
        if req.inflight:
            # Launched steps not processed yet (overlap): their slots go back (a later step may
            # take them; the forward thread writes it after these), and what is cached is what
            # the synchronous path would cache, the KV of fill_ids but the newest token.
            keep = max(min(req.kv_len, req.fill_len - 1), owned)
            self.allocator.free(row[keep : req.kv_len].clone())
            req.kv_len = keep
        if cache:
            tokens = req.fill_ids[: req.kv_len]
            self.tree_cache.cache_finished(tokens, row[: req.kv_len].clone(), owned, req.last_node)
        else:
            self.allocator.free(row[owned : req.kv_len].clone())
            self.tree_cache.dec_lock_ref(req.last_node)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx = None

    def _emit(self, req: Req) -> None:
        self.outbox.append(
            TokenIDOut(
                rid=req.rid,
                new_token_ids=req.output_ids[req.sent_output_len :],
                finished_reason=req.finished_reason,
                prompt_tokens=req.prompt_len,
                completion_tokens=len(req.output_ids),
                cached_tokens=req.cached_tokens,
                input_token_logprobs=req.pending_input_logprobs,
                output_token_logprobs=req.pending_output_logprobs,
                input_top_logprobs=req.pending_input_top,
                output_top_logprobs=req.pending_output_top,
                decode=req.decode,
            )
        )
        req.decode = None
        req.sent_output_len = len(req.output_ids)
        req.pending_input_logprobs, req.pending_input_top = [], []
        req.pending_output_logprobs, req.pending_output_top = [], []

    def flush_outbox(self) -> None:
        if self.outbox:
            self.io.send(BatchTokenIDOut(self.outbox))
            self.outbox = []
