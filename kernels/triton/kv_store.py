"""KV-cache store: write this step's k/v [T, Hkv, D] into the token-indexed pool at slots `loc`.

Torch reference: `TokenToKVPool.set_kv_buffer` (an indexed assignment, cast to the pool dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_buf_ptr, v_buf_ptr, loc_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_bt, stride_bh,
    num_heads, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
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
    tl.store(k_buf_ptr + dst, k.to(k_buf_ptr.dtype.element_ty), mask=mask)
    tl.store(v_buf_ptr + dst, v.to(v_buf_ptr.dtype.element_ty), mask=mask)


def store_kv(k_buf: torch.Tensor, v_buf: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """k_buf/v_buf: [slots, Hkv, D] pool buffers; loc: [T] slots; k/v: [T, Hkv, D] (cast to the pool dtype)."""
    t, hkv, d = k.shape
    assert v.shape == k.shape and k_buf.shape[1:] == (hkv, d), f"k {tuple(k.shape)} does not fit {tuple(k_buf.shape)}"
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_buf.is_contiguous() and v_buf.is_contiguous()
    if t == 0:
        return
    _store_kv_kernel[(t,)](
        k, v, k_buf, v_buf, loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_buf.stride(0), k_buf.stride(1),
        hkv, d,
        BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
    )  # fmt: skip
