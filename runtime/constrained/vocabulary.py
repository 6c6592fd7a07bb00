"""A tokenizer's vocabulary as byte strings, the alphabet grammar automata run over.

    token_bytes(tokenizer) -> {token id: bytes}
    TokenVocab.build(token bytes, vocab_size, eos ids) -> the padded matrix the masks scan

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) spell each byte as one printable character
(GPT-2's `bytes_to_unicode`); SentencePiece tokenizers spell a space as U+2581 and raw bytes as
`<0xNN>`. Special and added tokens (chat markers, EOS) get no bytes: a grammar never emits them,
EOS is handled apart (allowed exactly where the grammar may end).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from loom.runtime.constrained.bitmask import bitmask_width


@functools.lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character -> byte map (the inverse of `bytes_to_unicode`)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _sentencepiece_bytes(token: str) -> bytes:
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def token_bytes(tokenizer: Any) -> dict[int, bytes]:
    """token id -> the bytes it stands for, for every ordinary (non-special, non-added) token."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    skip = set(getattr(tokenizer, "all_special_ids", ())) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    decoder = byte_decoder()
    ordinary = {s: i for s, i in vocab.items() if i not in skip}
    byte_level = all(c in decoder for s in ordinary for c in s)
    out: dict[int, bytes] = {}
    for s, i in ordinary.items():
        b = bytes(decoder[c] for c in s) if byte_level else _sentencepiece_bytes(s)
        if b:
            out[i] = b
    return out


@dataclass(frozen=True, slots=True)
class TokenVocab:
    """The vocabulary as the masks walk it: every non-EOS token with bytes, as a padded matrix,
    shared by every grammar compiled for this vocabulary."""

    ids: np.ndarray  # [N] int64 token ids
    data: np.ndarray  # [N, L] uint8, zero-padded
    lens: np.ndarray  # [N] int64
    by_id: dict[int, bytes]
    vocab_size: int
    eos_token_ids: frozenset[int]

    @classmethod
    def build(cls, token_bytes: dict[int, bytes], vocab_size: int, eos_token_ids: frozenset[int]) -> TokenVocab:
        items = sorted((i, b) for i, b in token_bytes.items() if b and i not in eos_token_ids and i < vocab_size)
        width = max((len(b) for _, b in items), default=1)
        data = np.zeros((len(items), width), dtype=np.uint8)
        for row, (_, b) in enumerate(items):
            data[row, : len(b)] = np.frombuffer(b, dtype=np.uint8)
        ids = np.array([i for i, _ in items], dtype=np.int64)
        lens = np.array([len(b) for _, b in items], dtype=np.int64)
        return cls(ids, data, lens, dict(items), vocab_size, frozenset(eos_token_ids))

    def pack(self, token_ids: np.ndarray | list[int]) -> np.ndarray:
        """token ids -> packed words [ceil(V / 32)] uint32 (bit i % 32 of word i // 32)."""
        width = bitmask_width(self.vocab_size)
        bits = np.zeros(width * 32, dtype=bool)
        bits[np.asarray(token_ids, dtype=np.int64)] = True
        return np.packbits(bits, bitorder="little").view(np.uint32)


_ROWS: dict[int, tuple[TokenVocab, np.ndarray]] = {}


def token_rows(vocab: TokenVocab) -> np.ndarray:
    """[vocab_size] int64: each token id's row of the vocabulary matrix (-1: none), once per vocabulary."""
    hit = _ROWS.get(id(vocab))
    if hit is None or hit[0] is not vocab:
        if len(_ROWS) >= 4:
            _ROWS.clear()
        row_of = np.full(vocab.vocab_size, -1, dtype=np.int64)
        row_of[vocab.ids] = np.arange(len(vocab.ids))
        hit = _ROWS[id(vocab)] = (vocab, row_of)
    return hit[1]
