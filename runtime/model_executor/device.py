"""Where and in what precision the model runs: the device and dtype an engine argument names, and
the one way host tensors reach that device."""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """"auto" -> cuda when available, else cpu; a bare "cuda" -> GPU `gpu_id` (data-parallel
    replicas and tensor-parallel ranks each take their own)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", gpu_id)
    return resolved


def resolve_dtype(dtype: str, device: torch.device, config: Any) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slower and less exact; fp32 is the CPU default
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
