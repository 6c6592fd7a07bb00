"""Packed token bitmasks: bit i of word i // 32 set = token i allowed (int32 words, as xgrammar).

    bitmask: [B, ceil(V / 32)] int32  ->  apply_token_bitmask_(logits [B, V], bitmask): disallowed -> -inf
"""

from __future__ import annotations

import sys
import weakref

import numpy as np
import torch

assert sys.byteorder == "little", "the bitmask's byte view assumes a little-endian host"
_SHIFTS = torch.arange(32, dtype=torch.int32)  # [32]
_BYTE_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)  # [8]


def bitmask_width(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def pack_ids(ids: np.ndarray, width: int) -> np.ndarray:
    """Token ids -> packed words [width] uint32 (a few ids: no vocabulary-sized buffer)."""
    out = np.zeros(width, dtype=np.uint32)
    if len(ids):
        ids = np.sort(ids)
        word = ids >> 5
        starts = np.flatnonzero(np.concatenate(([True], word[1:] != word[:-1])))  # first id of each word
        out[word[starts]] = np.bitwise_or.reduceat(np.left_shift(np.uint32(1), (ids & 31).astype(np.uint32)), starts)
    return out


_BITS = np.arange(32, dtype=np.uint32)


def unpack_ids(words: np.ndarray) -> np.ndarray:
    """Packed words (uint32, 1-D) -> the token ids set in them, ascending, int64 (a sparse mask: only
    its non-zero words are read; rows of a block flattened number on: row r's id i is r * 32 * width + i)."""
    w = np.flatnonzero(words != 0)  # (a bool array: ~7x faster than the words)
    hit = (words[w, None] >> _BITS) & 1  # [k, 32]
    return (w[:, None] * 32 + _BITS)[hit.astype(bool)].astype(np.int64)


def allocate_token_bitmask(batch_size: int, vocab_size: int) -> torch.Tensor:
    """An all-allowed bitmask [B, ceil(V / 32)] int32 (every bit set: -1)."""
    return torch.full((batch_size, bitmask_width(vocab_size)), -1, dtype=torch.int32)


def pack_allowed(token_ids: list[int], vocab_size: int) -> torch.Tensor:
    """Allowed token ids -> one packed row [ceil(V / 32)] int32; ids >= vocab_size are dropped."""
    width = bitmask_width(vocab_size)
    allowed = torch.zeros(width * 32, dtype=torch.bool)
    if token_ids:
        ids = torch.tensor(token_ids, dtype=torch.int64)
        allowed[ids[ids < vocab_size]] = True
    words = (allowed.view(width, 32).to(torch.int64) << _SHIFTS.to(torch.int64)).sum(dim=-1)  # [W] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


SPARSE_KEEP = 8192  # allowed-id lists longer than this are not kept (only their length)
_sparse_cache: dict[int, torch.Tensor | int] = {}  # id(mask tensor) -> ids, or their number; dropped with the tensor


def sparse_ids(words: torch.Tensor, limit: int) -> torch.Tensor | None:
    """A packed mask row [W] int32 -> the ids of its set bits (int64, ascending) when there are at
    most `limit` of them, else None. Remembered per mask tensor: the compilers cache one tensor
    per mask class, so each class is unpacked once. Called from the scheduler's thread only."""
    key = id(words)
    hit = _sparse_cache.get(key)
    if hit is None:
        bits = np.unpackbits(words.contiguous().numpy().view(np.uint8), bitorder="little")
        ids = np.flatnonzero(bits)
        hit = _sparse_cache[key] = torch.from_numpy(ids.astype(np.int64)) if len(ids) <= SPARSE_KEEP else len(ids)
        weakref.finalize(words, _sparse_cache.pop, key, None)
    if isinstance(hit, int) or hit.numel() > limit:
        return None
    return hit


def _bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 -> [B, V] uint8, nonzero where the bit is set. Works on the bytes (a
    little-endian int32's bit i is bit i % 8 of its byte i // 8): 4x less memory than shifting words."""
    # bitmask: [B, W]
    weights = _BYTE_BITS.to(bitmask.device)  # [8]
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [B, 4W]
    return (as_bytes.unsqueeze(-1) & weights).reshape(bitmask.shape[0], -1)[:, :vocab_size]  # [B, V]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 -> [B, V] bool (True: allowed). Vectorised bit ops, no Python loop."""
    return _bits(bitmask, vocab_size).ne(0)


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None, use_triton: bool | None = None
) -> None:
    """Set disallowed logits to -inf in place. `rows` (int64 [R]) picks the logits rows the R
    bitmask rows belong to; None: bitmask row i is logits row i. `use_triton` (default: on CUDA)
    runs the Triton kernel, one program per row block, instead of unpacking the bits with torch."""
    # logits: [B, V]; bitmask: [R, W]
    if use_triton if use_triton is not None else logits.is_cuda:
        from loom.kernels.triton.bitmask import apply_token_bitmask_inplace

        bitmask = bitmask.to(logits.device)
        if rows is None and logits.stride(-1) == 1:
            apply_token_bitmask_inplace(logits, bitmask.contiguous())
            return
        rows = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows.to(logits.device)
        sub = logits.index_select(0, rows).contiguous()  # [R, V]
        apply_token_bitmask_inplace(sub, bitmask.contiguous())
        logits.index_copy_(0, rows, sub)
        return
    disallowed = _bits(bitmask.to(logits.device), logits.shape[-1]).eq(0)  # [R, V]
    if rows is None or rows.numel() == logits.shape[0]:
        if rows is not None and not torch.equal(rows.cpu(), torch.arange(logits.shape[0])):
            disallowed = disallowed[torch.argsort(rows.to(logits.device))]
        logits.masked_fill_(disallowed, float("-inf"))
    else:
        rows = rows.to(logits.device)
        sub = logits.index_select(0, rows).masked_fill_(disallowed, float("-inf"))  # [R, V]
        logits.index_copy_(0, rows, sub)
