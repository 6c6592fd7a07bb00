"""KV-cache store: write this step's k/v [T, Hkv, D] into the token-indexed pool at slots `loc`.

Torch reference: `TokenToKVPool.set_kv_buffer` (an indexed assignment, cast to the pool dtype; with
an fp8 e4m3 pool, quantized at the layer's scales). Both quantize bit for bit alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def round_to_e4m3(x):
    """fp32 with |x| <= 448 -> the nearest e4m3 value, ties to even, still fp32 (so the cast to fp8 is exact).

    Rounded by arithmetic rather than left to the fp8 conversion, whose rounding Triton's interpreter
    gets wrong (ties, carries, subnormals): on a GPU and under the interpreter alike this is what
    torch's `.to(torch.float8_e4m3fn)` gives, -0 included.
    """
    bits = x.to(tl.int32, bitcast=True)
    a = tl.abs(x)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |x|)
    e = tl.maximum(e, -6)  # below 2^-6 e4m3 is subnormal: one fixed quantum, 2^-9
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    y = a * ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # a / quantum, exact: in [0, 16)
    y = (y + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds y to an integer, ties to even
    r = y * quantum
    return tl.where(bits < 0, -r, r)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, loc_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_bh,
    num_heads, head_dim, k_inv_scale, v_inv_scale,
    QUANT: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(loc_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_heads) & (d[None, :] < head_dim)
    src_k = k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :]
    src_v = v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :]
    dst = slot * stride_bt + h[:, None] * stride_bh + d[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if QUANT:  # +-448: the largest e4m3 value (FP8_E4M3_MAX in loom.radix_cache.memory_pool)
        k = round_to_e4m3(tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -448.0), 448.0))
        v = round_to_e4m3(tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -448.0), 448.0))
    tl.store(k_buf_ptr + dst, k.to(k_buf_ptr.dtype.element_ty), mask=mask)
    tl.store(v_buf_ptr + dst, v.to(v_buf_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_scale: float | None = None, v_scale: float | None = None,
) -> None:  # fmt: skip
    """k_buf/v_buf: [slots, Hkv, D] pool buffers; loc: [T] slots; k/v: [T, Hkv, D] (cast to the pool dtype).

    With float8_e4m3fn buffers, `k_scale`/`v_scale` (the layer's) are required: the pool holds
    round(x * (1 / scale)) saturated at +-448, as `TokenToKVPool.set_kv_buffer` stores it.
    """
    t, hkv, d = k.shape
    assert v.shape == k.shape and k_buf.shape[1:] == (hkv, d), f"k {tuple(k.shape)} does not fit {tuple(k_buf.shape)}"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_buf.is_contiguous() and v_buf.is_contiguous()
    quant = k_buf.dtype == torch.float8_e4m3fn
    assert v_buf.dtype == k_buf.dtype and (not quant or (k_scale is not None and v_scale is not None)), (
        "an fp8 pool needs the layer's k_scale and v_scale"
    )
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k, v, k_buf, v_buf, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_buf.stride(0), k_buf.stride(1),
        hkv, d, 1.0 / k_scale if quant else 1.0, 1.0 / v_scale if quant else 1.0,
        QUANT=quant, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
