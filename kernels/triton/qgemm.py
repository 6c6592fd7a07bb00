"""Weight-only quantized GEMM: y = x @ dequant(qweight)^T for GGUF's Q8_0, Q4_0 and Q4_1 blocks.

`qweight` is the layout the CPU kernel and the loader use (`kernels/cpu`): uint8 [N, K / 32 * block
bytes], 32 weights per block along the input features K; Q8_0 = fp16 d + 32 int8 (w = d * q), Q4_0 =
fp16 d + 16 bytes of nibbles (w = d * (q - 8)), Q4_1 = fp16 d, fp16 m + 16 bytes (w = d * q + m). A
byte i of the nibbles holds weight i (low half) and weight i + 16 (high half).

Design, and why:
- The blocks are read as they are, with no repacking at load: the same bytes serve the CPU kernel,
  the sparse logits of the grammar path (`ParallelLMHead.logits_for_ids`), GPTQ/AWQ repacked as
  Q4_1, and tensor-parallel shards of whole blocks; each row stays self-contained, as llama.cpp's
  CUDA `mul_mat_vec_q` reads it. Every row's byte count is even, so the same storage is also read as
  fp16 (`qweight.view(torch.float16)`): a block's d (and m) is one fp16 load, not two bytes joined.
  What a Marlin-class kernel adds (weights interleaved for the tensor cores, wide aligned loads,
  scales apart) is a load-time repack that this layout leaves room for, once a GPU measures it.
- Dequantisation is fused: each program turns a [BLOCK_N, BLOCK_K] tile of blocks into floats in
  registers (fp32: d * q + m exactly as the reference computes it) and multiplies it at once; no
  full-size float copy of a weight exists.
- A 4-bit block's 16 bytes are loaded once and split into both nibbles with `tl.join`, which leaves
  the tile's columns in byte order (weight i, weight i + 16, ...); x is gathered in that same order
  (`_tile_k`), so the dot product is unchanged and no shuffle of the weights is needed.
- One row (decode at batch 1) runs a GEMV: a program per BLOCK_N outputs, multiply-and-sum in fp32
  on the CUDA cores (a tensor-core tile would be 1/16 used). More rows run `tl.dot` tiles
  (BLOCK_M 16-64), the weight tile cast to x's dtype, accumulated in fp32 (fp32 x: IEEE, not tf32).
- Too few output tiles to fill the GPU (small N, few rows) split K: each split writes fp32 partial
  sums and torch adds them in a fixed order, so results are deterministic (no atomics).
The block sizes are starting points to be tuned on a GPU (`benchmarks/bench_gpu.py --qgemm`).

Torch reference: `qgemm_torch` (x @ the dequantised weight, `kernels.cpu.dequantize`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from loom.kernels.cpu import BLOCK, BLOCK_BYTES, dequantize

QGEMM_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # the kernel's QTYPE is the index here
GEMV_MAX_ROWS = 1  # up to here the GEMV kernel, above it the tl.dot tiles


def qgemm_torch(x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: x [..., K] @ dequant(qweight)^T (+ bias) in fp32, returned in x's dtype -> [..., N]."""
    y = x.float() @ dequantize(qweight, qtype, x.shape[-1]).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


@triton.jit
def _tile_k(kb0, QTYPE: tl.constexpr, BLOCK_K: tl.constexpr):
    """-> [BLOCK_K]: the input feature of each column of `_weight_tile`'s tile that starts at block kb0."""
    c = tl.arange(0, BLOCK_K)
    if QTYPE == 0:
        k = kb0 * 32 + c
    else:
        k = kb0 * 32 + (c // 32) * 32 + (c // 2) % 16 + (c % 2) * 16  # byte i's low nibble, then its high one
    return k


@triton.jit
def _weight_tile(w8_ptr, w16_ptr, rows, row_mask, kb0, kb_end, row_halves,
                 QTYPE: tl.constexpr, BLOCK_HALVES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """-> [BLOCK_N, BLOCK_K] fp32: the weights of `rows`, blocks [kb0, kb0 + BLOCK_K / 32) (those from kb_end
    on read as 0), columns in `_tile_k`'s order. w8_ptr: the blocks as bytes (int8 for Q8_0, uint8 for the
    nibbles); w16_ptr: the same bytes as fp16; a block is BLOCK_HALVES fp16 long, a row row_halves."""
    blk = kb0 + tl.arange(0, BLOCK_K // 32)
    mask = row_mask[:, None] & (blk < kb_end)[None, :]  # [BLOCK_N, NB]
    half = rows[:, None].to(tl.int64) * row_halves + blk[None, :] * BLOCK_HALVES  # each block's first fp16: d
    d = tl.load(w16_ptr + half, mask=mask, other=0.0).to(tl.float32)
    if QTYPE == 0:
        j = tl.arange(0, 32)
        q = tl.load(w8_ptr + (half * 2 + 2)[:, :, None] + j[None, None, :], mask=mask[:, :, None], other=0)
        w = d[:, :, None] * q.to(tl.float32)  # [BLOCK_N, NB, 32]
    else:
        i = tl.arange(0, 16)
        first = half * 2 + 2 * BLOCK_HALVES - 16  # the 16 bytes of nibbles end the block
        byte = tl.load(w8_ptr + first[:, :, None] + i[None, None, :], mask=mask[:, :, None], other=0).to(tl.int32)
        q = tl.join(byte & 15, byte >> 4).to(tl.float32)  # [BLOCK_N, NB, 16, 2]
        if QTYPE == 1:
            w = d[:, :, None, None] * (q - 8.0)
        else:
            m = tl.load(w16_ptr + half + 1, mask=mask, other=0.0).to(tl.float32)
            w = d[:, :, None, None] * q + m[:, :, None, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


@triton.jit
def _qgemv_kernel(
    x_ptr, w8_ptr, w16_ptr, bias_ptr, out_ptr,
    N, nblocks, row_halves, blocks_per_split, stride_xm, stride_os, stride_om,
    QTYPE: tl.constexpr, BLOCK_HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (n tile, row, K split): out[split, row, n tile] = x[row] . the tile's weights, over the split."""
    pid_n, row, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, nblocks)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_K // 32):
        w = _weight_tile(w8_ptr, w16_ptr, rows, row_mask, kb0, kb_end, row_halves, QTYPE, BLOCK_HALVES, BLOCK_N, BLOCK_K)
        k = _tile_k(kb0, QTYPE, BLOCK_K)
        xk = tl.load(x_ptr + row * stride_xm + k, mask=k < kb_end * 32, other=0.0).to(tl.float32)
        acc += tl.sum(w * xk[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + split * stride_os + row * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _qgemm_kernel(
    x_ptr, w8_ptr, w16_ptr, bias_ptr, out_ptr,
    M, N, nblocks, row_halves, blocks_per_split, stride_xm, stride_os, stride_om,
    QTYPE: tl.constexpr, BLOCK_HALVES: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Program (n tile, m tile, K split): out[split, m tile, n tile] = x[m tile] @ the tile's weights^T."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = ms < M
    kb_start = split * blocks_per_split
    kb_end = tl.minimum(kb_start + blocks_per_split, nblocks)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(kb_start, kb_end, BLOCK_K // 32):
        w = _weight_tile(w8_ptr, w16_ptr, rows, row_mask, kb0, kb_end, row_halves, QTYPE, BLOCK_HALVES, BLOCK_N, BLOCK_K)
        k = _tile_k(kb0, QTYPE, BLOCK_K)
        xt = tl.load(x_ptr + ms[:, None].to(tl.int64) * stride_xm + k[None, :],
                     mask=m_mask[:, None] & (k < kb_end * 32)[None, :], other=0.0)  # fmt: skip
        wt = tl.trans(w.to(x_ptr.dtype.element_ty))  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc = tl.dot(xt, wt, acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, wt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + split * stride_os + ms[:, None].to(tl.int64) * stride_om + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & row_mask[None, :])


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter: no split unless asked)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _split_k(tiles: int, nblocks: int, blocks_per_step: int, sms: int) -> int:
    """K splits that give about two programs per SM when the output tiles alone are fewer than the SMs,
    each split keeping at least two K steps."""
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(2 * sms, tiles), nblocks // (2 * blocks_per_step)))


def qgemm(
    x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None,
    split_k: int | None = None, gemv: bool | None = None,
) -> torch.Tensor:  # fmt: skip
    """x [..., K] (fp32, fp16 or bf16) @ dequant(qweight)^T (+ bias) -> [..., N] in x's dtype, accumulated in fp32.

    qweight: uint8 [N, K / 32 * block bytes] in `qtype` (Q8_0, Q4_0 or Q4_1) on x's device; bias: [N].
    `split_k` (splits of K) and `gemv` (the one-row kernel for any row count) override the heuristics,
    for tests and tuning.
    """
    assert qtype in QGEMM_TYPES, f"qgemm reads {', '.join(QGEMM_TYPES)} blocks, not {qtype}"
    shape = x.shape
    k = shape[-1]
    n = qweight.shape[0]
    nblocks = k // BLOCK
    assert k % BLOCK == 0 and qweight.dtype == torch.uint8 and qweight.shape[1] == nblocks * BLOCK_BYTES[qtype], (
        f"{qtype} blocks for {k} input features are uint8 [N, {k // BLOCK * BLOCK_BYTES[qtype]}], got "
        f"{qweight.dtype} {tuple(qweight.shape)}"
    )
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"x must be fp32, fp16 or bf16, got {x.dtype}"
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    qweight = qweight.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*shape[:-1], n)
    w8 = qweight.view(torch.int8) if qtype == "Q8_0" else qweight
    w16 = qweight.view(torch.float16)  # every row and block starts at an even byte
    use_gemv = m <= GEMV_MAX_ROWS if gemv is None else gemv
    if use_gemv:
        block_m, block_n, block_k = 1, 8, 256
    else:
        block_m, block_n, block_k = (16 if m <= 16 else 32 if m <= 32 else 64), 64, 64
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    splits = split_k or _split_k(grid_n * grid_m, nblocks, block_k // BLOCK, _multiprocessors(x.device))
    step = block_k // BLOCK
    blocks_per_split = triton.cdiv(triton.cdiv(nblocks, splits), step) * step  # whole steps per split
    splits = triton.cdiv(nblocks, blocks_per_split)
    dst = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    fused_bias = bias is not None and splits == 1
    args = (x2, w8, w16, bias if fused_bias else dst, dst)
    strides = (qweight.stride(0) // 2, blocks_per_split, x2.stride(0), dst.stride(0) if splits > 1 else 0, n)
    meta = dict(QTYPE=QGEMM_TYPES.index(qtype), BLOCK_HALVES=BLOCK_BYTES[qtype] // 2, HAS_BIAS=fused_bias, BLOCK_N=block_n,
                BLOCK_K=block_k)  # fmt: skip
    if use_gemv:
        _qgemv_kernel[(grid_n, m, splits)](*args, n, nblocks, *strides, **meta)
    else:
        _qgemm_kernel[(grid_n, grid_m, splits)](*args, m, n, nblocks, *strides, IEEE=x.dtype == torch.float32, BLOCK_M=block_m,
                                                **meta)  # fmt: skip
    if splits > 1:
        summed = dst.sum(0)
        if bias is not None:
            summed += bias.float()
        out.copy_(summed)
    return out.reshape(*shape[:-1], n)
