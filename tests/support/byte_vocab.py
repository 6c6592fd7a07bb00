"""A vocabulary of one token per byte (token b + 1 is byte b, token 0 is EOS), in which any text
can be fed; and a random walk under a JSON Schema's mask in it."""

from __future__ import annotations

import json
import random

from loom.runtime.constrained import GrammarBackend, allocate_token_bitmask, unpack_bitmask

EOS = 0
BYTES = {b + 1: bytes([b]) for b in range(256)}  # token b + 1 is byte b
V = 257


def walk(backend: GrammarBackend, schema: dict, seed: int, max_steps: int = 300) -> bytes | None:
    """A random walk under the schema's mask, leaning towards '"' and EOS so that it ends; None if
    the budget runs out first."""
    g = backend.compile("json_schema", json.dumps(schema)).result(timeout=60).matcher()
    rng, row, out = random.Random(seed), allocate_token_bitmask(1, V), bytearray()
    for _ in range(max_steps):
        g.fill_mask(row[0])
        ids = unpack_bitmask(row, V)[0].nonzero().view(-1).tolist()
        assert ids, f"empty mask after {bytes(out)!r}"
        if EOS in ids:
            assert g.accept_token(EOS)
            return bytes(out)
        closers = [t for t in ids if BYTES[t] in (b'"', b"}", b"]")]
        token = rng.choice(closers) if closers and rng.random() < 0.3 else rng.choice(ids)
        assert g.accept_token(token)
        out += BYTES[token]
    return None
