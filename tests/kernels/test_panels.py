"""Quantized layers laid out in panels of 16 output rows (kernels/cpu/panels.py, panels.cpp): the layout
is GGUF's bytes rearranged and read back exactly, and the AVX512-VNNI panel kernel computes what the
GGUF-order int8 kernel computes (the same int8 activations and integer block dot products; only the
fp32 summation order differs, so 1e-5 of the output), within the int8 rounding bound of the float
product, at 1 to 70 rows, one to several K chunks and one or both threads. A model loaded here has
its layers in panels, and its steps equal those of the model kept in GGUF's order."""

from __future__ import annotations

import platform

import pytest
import torch
from test_qlinear import random_blocks
from test_qlinear_int8 import assert_within_activation_rounding

from loom.kernels.cpu import INT8_ENV, dequantize, extension, qlinear
from loom.kernels.cpu.panels import BLOCK_BYTES, from_panels, to_panels
from loom.runtime.layers.quantized import pack_panels, panels_available
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.server_args import ServerArgs

from gguf_files import Q, write_gguf

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]
x86 = platform.machine() in ("x86_64", "AMD64")
needs_kernel = pytest.mark.skipif(
    not (x86 and extension() is not None and extension().panels_built()), reason="the panel kernel needs AVX512-VNNI"
)


@pytest.mark.parametrize("qtype", QTYPES)
def test_panels_are_the_blocks_bytes_rearranged_and_read_back(qtype):
    n, k = 48, 96
    blocks = random_blocks(n, k, qtype, seed=3)
    panels = to_panels(blocks, qtype)
    assert panels.shape == blocks.shape and panels.dtype == torch.uint8
    assert torch.equal(from_panels(panels, qtype), blocks)
    # Row 16 p + r, block j: its quants' 4-byte group v is at panel p's block j, vector v, bytes 4 r .. 4 r + 3.
    bb, sb = BLOCK_BYTES[qtype], 4 if qtype == "Q4_1" else 2
    p, r, j, v = 2, 5, 1, 3
    block = blocks[16 * p + r, j * bb : (j + 1) * bb]
    at = panels.reshape(n // 16, k // 32, 16 * bb)[p, j]
    group = at[64 * v + 4 * r : 64 * v + 4 * r + 4]
    want = block[sb + 4 * v : sb + 4 * v + 4]
    assert torch.equal(group, want ^ 0x80 if qtype == "Q8_0" else want)
    quant_bytes = 16 * (bb - sb)
    assert torch.equal(at[quant_bytes + 2 * r : quant_bytes + 2 * r + 2], block[0:2])  # d
    if qtype == "Q4_1":
        assert torch.equal(at[quant_bytes + 32 + 2 * r : quant_bytes + 34 + 2 * r], block[2:4])  # m


@pytest.mark.parametrize("shape", [(17, 60), (32, 50)])
def test_panels_refuse_partial_panels_or_blocks(shape):
    blocks = torch.zeros(shape, dtype=torch.uint8)
    with pytest.raises(ValueError, match="panels"):
        to_panels(blocks, "Q4_1")


@needs_kernel
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 16, 70])
@pytest.mark.parametrize("n, k", [(16, 32), (48, 96), (512, 576), (96, 2048)])  # 1-32 panels; 1-64 blocks (2+ K chunks)
def test_panel_kernel_equals_the_gguf_order_int8_kernel(qtype, rows, n, k):
    blocks = random_blocks(n, k, qtype, seed=rows + n + k)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows * 3 + k))
    x[:, :32] *= 10  # an outlier block
    got = qlinear(x, to_panels(blocks, qtype), qtype, panels=True)
    want = qlinear(x, blocks, qtype, int8=True)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert_within_activation_rounding(got, x, dequantize(blocks, qtype, k))


@needs_kernel
def test_zero_rows_and_zero_blocks_give_zeros():
    blocks = random_blocks(32, 64, "Q4_1", seed=1)
    x = torch.zeros(2, 64)
    x[1, 32:] = 1.0  # row 1: its first block all zero (scale 0, no NaN)
    got = qlinear(x, to_panels(blocks, "Q4_1"), "Q4_1", panels=True)
    assert torch.equal(got[0], torch.zeros(32)) and torch.isfinite(got).all()
    torch.testing.assert_close(got, qlinear(x, blocks, "Q4_1", int8=True), rtol=1e-5, atol=1e-6)


@needs_kernel
def test_a_loaded_model_runs_its_layers_in_panels(tmp_path, monkeypatch):
    """ModelRunner lays the quantized layers out in panels (not the tied LM head's embedding rows),
    memory unchanged; a prefill through them equals the GGUF-order model's; with int8 activations
    off, or `disable_cpu_weight_packing`, nothing is packed."""
    path = write_gguf(tmp_path / "m.gguf", "llama", [Q.Q4_1, Q.Q8_0, Q.Q4_0], layers=2, seed=4)
    monkeypatch.setenv(INT8_ENV, "1")
    args = dict(model_path=str(path), quantization="auto", dtype="float32", max_total_tokens=256)
    packed = ModelRunner(ServerArgs(**args)).model
    plain = ModelRunner(ServerArgs(**args, disable_cpu_weight_packing=True)).model
    layers = {n: m for n, m in packed.named_modules() if getattr(m, "qweight", None) is not None and hasattr(m, "qpanels")}
    assert layers and all(m.qpanels for m in layers.values())
    others = dict(plain.named_modules())
    for name, layer in layers.items():
        ref = others[name]
        assert not ref.qpanels and layer.qweight.shape == ref.qweight.shape
        assert torch.equal(from_panels(layer.qweight, layer.qtype), ref.qweight)
        x = torch.randn(7, ref.qweight.shape[1] // BLOCK_BYTES[ref.qtype] * 32)
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5 * ref(x).abs().max().item())
    assert pack_panels(plain) == len(layers)  # what ModelRunner would have done
    monkeypatch.setenv(INT8_ENV, "0")
    assert not panels_available()
    assert not any(getattr(m, "qpanels", False) for m in ModelRunner(ServerArgs(**args)).model.modules())
