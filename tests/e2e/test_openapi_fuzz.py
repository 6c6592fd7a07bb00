"""Schemathesis against `loom serve`'s own /openapi.json: bodies drawn from the document's request
models never get a 5xx. Bounded: a fixed number of examples per route, no shrinking, a 16-token
context and at most 2 samples per prompt, so that no drawn request asks for minutes of decoding.

The document describes the bodies the routes parse (runtime/entrypoints/api_schema.py); this is
the check that a client following it meets only answers, or 4xx errors naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loom.checkpoint_writer import build_tiny_checkpoint

from server_proc import Server, serving

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a test dependency (pip install -e '.[test]')")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the skip: hypothesis comes with schemathesis)

EXAMPLES = 25


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    model = build_tiny_checkpoint(tmp_path_factory.mktemp("fuzz"), arch="qwen2", vocab_size=512, seed=5)
    with serving(model, "--context-length", "16") as srv:
        yield srv


def _cheap(case):
    """At most 2 samples per prompt (the document allows 128): 16 prompts x 74 samples decoding
    to the end of the context is a valid request, but minutes of work on a CPU."""
    body = case.body
    if isinstance(body, dict):
        params = body.get("sampling_params")
        for holder in [body, *(params if isinstance(params, list) else [params])]:
            if isinstance(holder, dict) and isinstance(holder.get("n"), int) and holder["n"] > 2:
                holder["n"] = 2
    return case


@pytest.mark.slow
def test_no_body_the_document_allows_gets_a_5xx(server) -> None:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /generate", "POST /v1/completions", "POST /v1/chat/completions"}
    for operation in operations:

        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None, phases=[Phase.explicit, Phase.generate])  # fmt: skip
        @given(case=operation.as_strategy().map(_cheap))
        def call(case) -> None:
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
            if response.status_code >= 400:
                assert "error" in response.json(), response.text[:500]

        call()
