"""Which implementation the RMSNorm and rotary layers run: Loom's Triton kernels or plain torch.

Each `RMSNorm` and `RotaryEmbedding` has a `fused_ops` choice (a constructor argument; for a whole
model, `set_fused_ops(model, choice)`):

- "auto" (the default): the Triton kernels (RMSNorm fused with the residual add; rotary in place
  over q and k) for tensors on CUDA when triton is installed, torch elsewhere, so torch stays the
  CPU path;
- "triton": the kernels wherever they run: on CUDA, or on the CPU under Triton's interpreter
  (`TRITON_INTERPRET=1` set before triton is first imported; slow, for tests);
- "torch": the torch path everywhere (the reference the kernels are tested against).

The kernels are imported on first use only, so a CPU user who never asks for them needs no Triton.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import torch
from torch import nn

import loom.kernels as kernels

FUSED_OPS = ("auto", "triton", "torch")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def check_fused_ops(choice: str) -> str:
    """`choice` if it is one of FUSED_OPS. Raises ValueError naming the choices otherwise."""
    if choice not in FUSED_OPS:
        raise ValueError(f"unknown fused_ops {choice!r}; expected one of {list(FUSED_OPS)}")
    return choice


def use_triton(choice: str, x: torch.Tensor) -> bool:
    """Whether a layer set to `choice` runs its Triton kernel on `x`."""
    if choice == "auto":
        return x.is_cuda and _TRITON_INSTALLED
    return choice == "triton"


def triton_kernels(device: torch.device) -> ModuleType:
    """`loom.kernels.triton`, for a layer about to run a kernel on `device`.

    Raises:
        ValueError: the kernels cannot run there: no triton, or off CUDA without Triton's interpreter
            (see `loom.kernels.triton_kernels`).
    """
    return kernels.triton_kernels(
        device,
        "fused_ops='triton'",
        "on device {device!r} needs Triton's interpreter (set TRITON_INTERPRET=1 before triton is first "
        "imported; slow, for tests); use fused_ops 'auto' or 'torch' off CUDA",
        "use 'auto' or 'torch'",
    )


def set_fused_ops(model: nn.Module, choice: str) -> int:
    """Set `choice` on every layer of `model` that has a `fused_ops` choice -> how many layers that is
    (a module shared by several layers, such as the rotary embedding, counts once)."""
    check_fused_ops(choice)
    layers = [m for m in model.modules() if hasattr(m, "fused_ops")]
    for m in layers:
        m.fused_ops = choice
    return len(layers)
