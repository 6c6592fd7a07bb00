"""Attention backends, chosen by name (`--attention-backend`) or by device ("auto")."""

from __future__ import annotations

from collections.abc import Callable

import torch

from loom.kernels.attention.base import AttentionBackend, AttentionLayer
from loom.kernels.attention.torch_native import TorchNativeAttnBackend

ATTENTION_BACKENDS: dict[str, Callable[[torch.device], AttentionBackend]] = {
    "torch_native": TorchNativeAttnBackend,
}
_PLANNED = ("triton", "flashinfer")


def create_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """A backend instance for `name` ("auto": the best one available on `device`).

    Raises:
        ValueError: an unknown name, or one that is planned but not available yet.
    """
    device = torch.device(device)
    if name == "auto":
        name = "torch_native"  # the only backend so far, on every device
    if name in ATTENTION_BACKENDS:
        return ATTENTION_BACKENDS[name](device)
    if name in _PLANNED:
        raise ValueError(f"attention backend {name!r} is not available yet; use 'torch_native' (or 'auto')")
    raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {sorted(ATTENTION_BACKENDS)}")


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionLayer", "TorchNativeAttnBackend", "create_attention_backend"]
