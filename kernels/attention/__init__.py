"""Attention backends, chosen by name (`--attention-backend`) or by device ("auto")."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from loom.kernels.attention.base import AttentionBackend, AttentionLayer
from loom.kernels.attention.torch_native import TorchNativeAttnBackend

ATTENTION_BACKENDS: dict[str, Callable[[torch.device], AttentionBackend]] = {
    "torch_native": TorchNativeAttnBackend,
}
_PLANNED = ("flashinfer",)


def _triton_backend(device: torch.device) -> AttentionBackend:
    """The Triton backend: on CUDA, or anywhere under Triton's interpreter (`TRITON_INTERPRET=1`).

    The kernels are imported only here, so that a CPU user who never asks for them needs no Triton.
    """
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"attention backend 'triton' is not available yet on device {device.type!r}: its kernels need CUDA, "
            "or Triton's interpreter (set TRITON_INTERPRET=1 before loom is imported; slow, for tests); "
            "use 'torch_native' (or 'auto')"
        )
    try:
        import loom.kernels.triton as triton_kernels
    except ImportError as e:
        raise ValueError(f"attention backend 'triton' needs the triton package ({e}); use 'torch_native'") from e
    if device.type != "cuda" and not triton_kernels.INTERPRETED:
        raise ValueError(
            "attention backend 'triton' off CUDA needs Triton's interpreter, but triton (or loom.kernels.triton) was "
            "imported before TRITON_INTERPRET=1 was set; set it before the first import of either"
        )
    from loom.kernels.attention.triton_backend import TritonAttnBackend

    return TritonAttnBackend(device)


def create_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """A backend instance for `name` ("auto": the best one available on `device`: triton on CUDA,
    torch_native elsewhere).

    Raises:
        ValueError: an unknown name, or one that is not available on `device` (triton on the CPU
            without `TRITON_INTERPRET=1`, flashinfer so far).
    """
    device = torch.device(device)
    if name == "auto":
        on_gpu = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        name = "triton" if on_gpu else "torch_native"
    if name == "triton":
        return _triton_backend(device)
    if name in ATTENTION_BACKENDS:
        return ATTENTION_BACKENDS[name](device)
    if name in _PLANNED:
        raise ValueError(f"attention backend {name!r} is not available yet; use 'torch_native' (or 'auto')")
    names = sorted([*ATTENTION_BACKENDS, "triton"])
    raise ValueError(f"unknown attention backend {name!r}; expected 'auto' or one of {names}")


__all__ = ["ATTENTION_BACKENDS", "AttentionBackend", "AttentionLayer", "TorchNativeAttnBackend", "create_attention_backend"]
