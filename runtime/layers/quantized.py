"""Weight-only quantized linear layers on the CPU: which layers are kept quantized, and their forward.

`quantization` (an engine argument) decides, per linear layer:
- `auto`: keep a GGUF file's own quantization where Loom has a kernel for it (Q8_0, Q4_0, Q4_1);
  other quantized types (K-quants, Q5_*) are repacked into Q8_0; float tensors stay float;
- `none`: every layer in the engine's float dtype (what the golden tests against Transformers use);
- `int8` / `int4`: quantize every linear layer at load into 32-weight blocks with a scale each
  (Q8_0), or a scale and a minimum each (Q4_1).

A quantized layer holds its blocks (`qweight`, uint8 [out, in / 32 * block bytes]) and no float
weight. On the CPU, up to `kernel_rows()` rows (decode, a batch's steps, short prefills) its forward
is `kernels/cpu` `qlinear`, which reads the blocks and dequantises them in registers (or multiplies
them with int8 activations); for more rows (prefill) it dequantises BAND output rows at a time and
multiplies each band in float, so no full-size float copy of a weight is ever made.
Where the CPU has AVX512-VNNI (and int8 activations are on), `pack_panels` lays each layer's blocks
out again at load, in panels of 16 output rows (`kernels/cpu/panels.py`, the same bytes): every row
count then runs the panel kernel, about 2x the GGUF-order kernel from 16 rows on and 1.3x torch's bf16
GEMM at 700 (benchmarks/bench_qlinear.py), with no dequantised band.
On CUDA every row count runs the Triton dequantise-GEMM (`kernels/triton/qgemm.py`) on the same blocks.
Blocks run along the input features: a row-parallel shard must hold whole blocks.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from loom.kernels.cpu import QTYPES, dequantize_into, extension, int8_activations, qlinear
from loom.kernels.cpu.panels import PANEL, to_panels

logger = logging.getLogger(__name__)

QUANTIZATION_MODES = ("auto", "none", "int8", "int4")
KERNEL_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # block formats qlinear reads
MODE_TYPES = {"int8": "Q8_0", "int4": "Q4_1"}
KERNEL_MAX_ROWS = 16  # the fused decode step's rows, and the kernel's with x in fp32; above, float bands
# With int8 activations the kernel beats dequantising bands well past the fused step's rows: the 30
# layers of SmolLM2 on one thread took 59 ms against 134 ms at 32 rows, 116 against 163 at 64, 241
# against 226 at 128 (the bands' cost is the dequantisation, paid once whatever the rows).
INT8_KERNEL_MAX_ROWS = 64
BAND = 512  # output rows dequantised at a time above kernel_rows()
FLOAT_TYPES = ("F32", "F16", "BF16")
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def runs_on(device: torch.device) -> bool:
    """Whether quantized layers have a kernel on `device`: the CPU's, or CUDA's Triton kernel when triton is installed."""
    return device.type == "cpu" or (device.type == "cuda" and _TRITON_INSTALLED)


def kernel_rows() -> int:
    """Rows up to which a quantized layer's CPU forward is the kernel (above: float bands)."""
    return INT8_KERNEL_MAX_ROWS if int8_activations() else KERNEL_MAX_ROWS


def quantized_linear(
    x: torch.Tensor, qweight: torch.Tensor, qtype: str, bias: torch.Tensor | None = None, panels: bool = False
) -> torch.Tensor:
    """x [..., in] @ dequant(qweight)^T + bias, in x's dtype (qweight on x's device); `panels`: qweight
    is laid out in panels (`pack_panels`; the CPU kernel at every row count, int8 activations)."""
    if x.is_cuda:
        import loom.kernels.triton as kt  # imported on first use: a CPU user needs no Triton

        return kt.qgemm(x, qweight, qtype, bias)
    rows = x.numel() // x.shape[-1]
    if panels or rows <= kernel_rows():
        y = qlinear(x if x.dtype == torch.float32 else x.float(), qweight, qtype, panels=panels)
    else:
        y = banded_linear(x, qweight, qtype)
    if bias is not None:
        y = y + bias.float()
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def banded_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: str) -> torch.Tensor:
    """x [..., in] @ dequant(qweight)^T for many rows: bands of BAND output rows dequantised into the
    activations' dtype (bf16 on a bf16 model: half the bytes written and the CPU's bf16 GEMM, 2x
    fp32's), one buffer reused for every band; in that dtype (fp32 for any other)."""
    dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16) else torch.float32
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    y = torch.empty(flat.shape[0], qweight.shape[0], dtype=dtype)
    buf = torch.empty(min(BAND, qweight.shape[0]), x.shape[-1], dtype=dtype)
    for n0 in range(0, qweight.shape[0], BAND):
        band = dequantize_into(qweight[n0 : n0 + BAND], qtype, buf[: min(BAND, qweight.shape[0] - n0)])
        torch.matmul(flat, band.T, out=y[:, n0 : n0 + band.shape[0]])
    return y.reshape(*x.shape[:-1], qweight.shape[0])


def panels_available() -> bool:
    """Whether `pack_panels` lays layers out in panels here: the extension has the panel kernel
    (AVX512-VNNI) and x is quantized to int8 (`LOOM_CPU_INT8_ACT` is not 0)."""
    ext = extension()
    return ext is not None and ext.panels_built() and int8_activations()


def pack_panels(model: torch.nn.Module) -> int:
    """Lay the blocks of every quantized CPU linear layer of `model` out in panels of 16 output rows
    (the same bytes: no memory added), where `panels_available()`. The tied LM head stays as it is
    (its rows are the embedding's, looked up a token at a time). -> the number of layers packed."""
    if not panels_available():
        return 0
    count = 0
    for module in model.modules():
        qweight = getattr(module, "qweight", None)
        if not hasattr(module, "qpanels") or qweight is None or qweight.device.type != "cpu":
            continue
        if module.qtype in QTYPES and qweight.shape[0] % PANEL == 0 and not module.qpanels:
            module.qweight, module.qpanels = to_panels(qweight, module.qtype), True
            count += 1
    return count


def layer_type(mode: str, sources: set[str]) -> str | None:
    """The block format one layer is kept in, given the GGUF types of the tensors it was loaded from
    (empty for a safetensors checkpoint); None: float."""
    if mode == "none":
        return None
    if mode in MODE_TYPES:
        return MODE_TYPES[mode]
    quantized = sources - set(FLOAT_TYPES)
    if not quantized:
        return None
    if len(sources) == 1 and quantized <= set(KERNEL_TYPES):
        return next(iter(quantized))
    return "Q8_0"  # K-quants, Q5_*, or shards of different types packed into one layer


# Checkpoint names of the projections packed into one layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def packed_source(tensor: str, module: str) -> bool:
    """Whether checkpoint tensor `tensor` is one of the projections packed into linear layer `module`."""
    prefix, _, last = module.rpartition(".")
    return any(tensor.startswith(f"{prefix}.{part}.") for part in _PACKED.get(last, ()))
