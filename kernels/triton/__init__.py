"""Triton kernels, one file each, every one with a torch reference beside it.

On a machine without a GPU they run under Triton's interpreter, which must be switched on
(`TRITON_INTERPRET=1`) before Triton and this package are first imported: `triton.jit` decides
at decoration time, for Triton's own `tl.*` library as much as for these kernels. `INTERPRETED`
records which way they were built.
"""

from __future__ import annotations

import triton.language as tl

from loom.kernels.triton.bitmask import apply_token_bitmask_inplace, apply_token_bitmask_inplace_torch
from loom.kernels.triton.decode_attention import decode_attention, decode_attention_torch, num_kv_splits_for
from loom.kernels.triton.extend_attention import extend_attention, extend_attention_torch
from loom.kernels.triton.kv_store import _store_kv_kernel, store_kv
from loom.kernels.triton.qgemm import qgemm, qgemm_torch
from loom.kernels.triton.rmsnorm import rmsnorm
from loom.kernels.triton.rotary import apply_rotary_, rotate_


def _interpreted() -> bool:
    """Whether these kernels, and Triton's own `tl.*` library they call, were built for the interpreter."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(_store_kv_kernel, InterpretedFunction) and isinstance(tl.sum, InterpretedFunction)


INTERPRETED: bool = _interpreted()

__all__ = [
    "INTERPRETED",
    "apply_rotary_",
    "apply_token_bitmask_inplace",
    "apply_token_bitmask_inplace_torch",
    "decode_attention",
    "decode_attention_torch",
    "extend_attention",
    "extend_attention_torch",
    "num_kv_splits_for",
    "qgemm",
    "qgemm_torch",
    "rmsnorm",
    "rotate_",
    "store_kv",
]
