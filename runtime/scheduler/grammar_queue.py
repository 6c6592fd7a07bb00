"""The grammar queue: a request with a regex / json_schema / ebnf / lark constraint waits here,
never in a batch, while its grammar compiles on `GrammarBackend`'s threads; once compiled it joins
the waiting queue with its matcher in `req.grammar`. A grammar that fails, is too large
(GrammarLimits: refused before it compiles) or takes longer than its timeout finishes the request
with a 400-style abort naming the field.

A compilation runs while some request holds its future (`GrammarBackend.compile`): a request that
leaves the queue (aborted, timed out) drops it, and a compilation no request waits for is stopped.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_futures

from loom.runtime.constrained import GrammarBackend, GrammarError, grammar_source
from loom.runtime.scheduler.schedule_batch import Req


class GrammarQueue:
    """The Scheduler's grammar compilation queue (a mixin over the scheduler's state)."""

    def get_grammar_backend(self) -> GrammarBackend:
        if self.grammar_backend is None:
            def token_bytes() -> dict[int, bytes]:  # called once, on a compile thread (loading takes a while)
                from loom.runtime.constrained import token_bytes as read_token_bytes
                from loom.runtime.tokenizer import load_tokenizer

                return read_token_bytes(load_tokenizer(self.args))

            self.grammar_backend = GrammarBackend(
                token_bytes, self.runner.vocab_size, self.eos_token_ids, grammar_backend=self.args.grammar_backend,
                limits=self.args.grammar_limits(),
            )
        return self.grammar_backend

    def poll_grammars(self) -> None:
        """Move requests whose grammar compiled to the waiting queue; finish those whose grammar
        failed or timed out. When there is nothing else to do, wait briefly for a compilation."""
        if not (self.waiting or self.running or self.chunked_req):
            wait_futures([f for _, f, _ in self.grammar_queue], timeout=0.05, return_when=FIRST_COMPLETED)
        now = time.monotonic()
        pending: list[tuple[Req, Future, float]] = []
        for req, fut, deadline in self.grammar_queue:
            if fut.done():
                exc = fut.exception()
                if exc is None:
                    req.grammar = fut.result().matcher()
                    self.waiting.append(req)
                else:
                    msg = str(exc) if isinstance(exc, GrammarError) else f"grammar compilation failed: {type(exc).__name__}: {exc}"
                    self.finish(req, self._grammar_rejected(req, msg))
            elif now > deadline:
                assert self.grammar_backend is not None
                kind, source = grammar_source(req.sampling_params)
                self.grammar_backend.forget(kind, source)
                limit = self.grammar_backend.compile_timeout_s
                self.finish(req, self._grammar_rejected(req, f"{kind} took longer than {limit:g}s to compile; simplify it"))
            else:
                pending.append((req, fut, deadline))
        self.grammar_queue = pending

    @staticmethod
    def _grammar_rejected(req: Req, message: str) -> dict:
        """The abort of a request whose grammar cannot be used: the user's mistake, so the server
        answers 400 naming the grammar's field (SGLang marks such aborts with a status code too)."""
        kind, _source = grammar_source(req.sampling_params)
        return {"type": "abort", "message": message, "status_code": 400, "param": f"sampling_params.{kind}"}
