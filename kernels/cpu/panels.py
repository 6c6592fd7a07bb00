"""GGUF blocks laid out in panels of 16 output rows for the AVX512-VNNI kernel (panels.cpp), and back.

A panel block holds the same bytes as the 16 rows' GGUF blocks, rearranged (see panels.cpp): the
4-byte groups of the 16 rows' quants interleaved, so one 64-byte vector holds 4 weights of each of
16 rows, then the 16 rows' scales. A layer keeps its [N, row bytes] shape and its size, and rows
[16 a, 16 b) of the panels are panels a to b (a band of output rows slices as GGUF's blocks do).
"""

from __future__ import annotations

import torch

PANEL = 16
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
SCALE_BYTES = {"Q8_0": 2, "Q4_0": 2, "Q4_1": 4}  # d (fp16), and Q4_1's m


def _split(blocks: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    n, row_bytes = blocks.shape
    bb = BLOCK_BYTES[qtype]
    if n % PANEL or row_bytes % bb:
        raise ValueError(f"panels need whole panels of {PANEL} rows and whole {qtype} blocks; got blocks of shape {tuple(blocks.shape)}")
    b = blocks.reshape(n // PANEL, PANEL, row_bytes // bb, bb)
    sb = SCALE_BYTES[qtype]
    return b[..., :sb], b[..., sb:], n // PANEL, row_bytes // bb


def to_panels(blocks: torch.Tensor, qtype: str) -> torch.Tensor:
    """GGUF blocks uint8 [N, K / 32 * block bytes] (N % 16 == 0) -> the same bytes in panels, same shape."""
    scales, quants, p, nb = _split(blocks.contiguous(), qtype)
    q = quants.reshape(p, PANEL, nb, -1, 4).permute(0, 2, 3, 1, 4)  # [P, nb, vectors, 16 rows, 4 bytes]
    if qtype == "Q8_0":
        q = q ^ 0x80  # int8 -> uint8 + 128
    s = scales.reshape(p, PANEL, nb, -1, 2).permute(0, 2, 3, 1, 4)  # [P, nb, d / m, 16 rows, 2 bytes]
    out = torch.cat([q.reshape(p, nb, -1), s.reshape(p, nb, -1)], dim=-1)
    return out.reshape(blocks.shape).contiguous()


def from_panels(panels: torch.Tensor, qtype: str) -> torch.Tensor:
    """The inverse of `to_panels`: GGUF blocks, uint8 [N, K / 32 * block bytes]."""
    n, row_bytes = panels.shape
    bb, sb = BLOCK_BYTES[qtype], SCALE_BYTES[qtype]
    if n % PANEL or row_bytes % bb:
        raise ValueError(f"panels of shape {tuple(panels.shape)} are not whole panels of {qtype} blocks")
    p, nb = n // PANEL, row_bytes // bb
    flat = panels.contiguous().reshape(p, nb, PANEL * bb)
    q = flat[..., : PANEL * (bb - sb)].reshape(p, nb, -1, PANEL, 4).permute(0, 3, 1, 2, 4)  # [P, 16, nb, vectors, 4]
    if qtype == "Q8_0":
        q = q ^ 0x80
    s = flat[..., PANEL * (bb - sb) :].reshape(p, nb, -1, PANEL, 2).permute(0, 3, 1, 2, 4)  # [P, 16, nb, d / m, 2]
    out = torch.cat([s.reshape(p, PANEL, nb, sb), q.reshape(p, PANEL, nb, bb - sb)], dim=-1)
    return out.reshape(n, row_bytes).contiguous()
