"""Where and in what precision the model runs: the device and dtype an engine argument names, and
the one way host tensors reach that device."""

from __future__ import annotations

import functools
import logging
import os
import pathlib
from typing import Any

import torch

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The CPU flags that make bf16 matmuls native (oneDNN's avx512_core_bf16 and avx512_core_amx
# kernels): without them a bf16 GEMM is emulated and slower than fp32. SGLang's CPU path keys on
# AMX (`torch._C._cpu._is_amx_tile_supported()`), IPEX on AVX512_BF16 or AMX; either will do here.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Set to float32 (or bfloat16) to make dtype "auto" on the CPU pick that whatever the flags say:
# to reproduce fp32 results on a bf16 machine, or to try bf16 on one without it.
CPU_AUTO_DTYPE_ENV = "LOOM_CPU_AUTO_DTYPE"


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """"auto" -> cuda when available, else cpu; a bare "cuda" -> GPU `gpu_id` (data-parallel
    replicas and tensor-parallel ranks each take their own)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", gpu_id)
    return resolved


@functools.cache
def native_bf16_flags() -> tuple[str, ...]:
    """Which of NATIVE_BF16_FLAGS this CPU has (empty: none, bf16 would be emulated).

    From torch's own CPU probe (`torch.cpu.get_capabilities`, torch >= 2.9), else /proc/cpuinfo."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        caps = get_capabilities()
        return tuple(flag for flag in NATIVE_BF16_FLAGS if caps.get(flag, False))
    try:
        cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)


def cpu_auto_dtype() -> tuple[torch.dtype, str]:
    """What dtype "auto" means on this CPU -> (dtype, the reason, for the log)."""
    forced = os.environ.get(CPU_AUTO_DTYPE_ENV)
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{CPU_AUTO_DTYPE_ENV} must be float32 or bfloat16, got {forced!r}")
        return _DTYPES[forced], f"{CPU_AUTO_DTYPE_ENV}={forced}"
    flags = native_bf16_flags()
    if flags:
        return torch.bfloat16, f"the CPU has native bf16 ({', '.join(flags)})"
    return torch.float32, f"the CPU has no native bf16 (none of {', '.join(NATIVE_BF16_FLAGS)}): bf16 would be emulated"


_logged_choices: set[tuple[torch.dtype, str]] = set()


def resolve_dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype:
    """The model's dtype. An explicit one as named. "auto": on the CPU bf16 where it is native
    (AVX512_BF16 or AMX: half the weight bytes a decode step reads; issue 17 measured a 135M
    model's body at one row in 18 ms against 36 ms in fp32) and fp32 elsewhere, as SGLang's and
    IPEX's CPU paths choose; on a GPU the checkpoint's bf16 or fp16, else bf16."""
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        chosen, reason = cpu_auto_dtype()
        if (chosen, reason) not in _logged_choices:  # once per process, not once per rank or engine
            _logged_choices.add((chosen, reason))
            logger.info("dtype auto -> %s on the CPU: %s (--dtype float32 or %s=float32 for fp32)",
                        str(chosen).removeprefix("torch."), reason, CPU_AUTO_DTYPE_ENV)  # fmt: skip
        return chosen
    checkpoint = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = _DTYPES.get(checkpoint)
    return checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.bfloat16


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`. From the CPU to CUDA through pinned memory, without waiting: the copy
    queues behind the kernels already launched instead of stalling the host."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
