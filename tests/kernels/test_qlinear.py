"""The CPU weight-only quantized linear kernel (kernels/cpu/qlinear.cpp): for GGUF's Q8_0, Q4_0 and
Q4_1 blocks and 1 to 17 rows, x @ dequant(W)^T equals the float reference on the float path, and the
reference equals the gguf package's own dequantisation. The int8-activation path (x quantized to
int8 32-blocks, llama.cpp's q8_0 / q8_1) is within the error that quantization of x allows
(test_qlinear_int8.py)."""

from __future__ import annotations

import platform

import gguf
import numpy as np
import pytest
import torch

from loom.kernels.cpu import BLOCK_BYTES, dequantize, dequantize_into, extension, qlinear, quantize


def random_blocks(n: int, k: int, qtype: str, seed: int) -> torch.Tensor:
    """Valid blocks: finite fp16 scales (and Q4_1 minimums), random quants."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, BLOCK_BYTES[qtype]), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.001).half().view(torch.uint8)
    blocks[..., 0:2] = scales
    if qtype == "Q4_1":
        blocks[..., 2:4] = ((torch.rand(n, k // 32, 1, generator=g) - 0.5) * 0.1).half().view(torch.uint8)
    return blocks.reshape(n, -1).contiguous()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_reference_equals_gguf_dequantisation(qtype):
    blocks = random_blocks(7, 96, qtype, seed=1)
    theirs = gguf.quants.dequantize(blocks.numpy(), gguf.GGMLQuantizationType[qtype])
    assert torch.equal(dequantize(blocks, qtype, 96), torch.from_numpy(np.ascontiguousarray(theirs)).float())


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_equals_the_reference(qtype, dtype):
    """The extension's dequantisation (prefill's bands) is the reference's values, rounded once
    to bf16 where the buffer is bf16."""
    blocks = random_blocks(37, 96, qtype, seed=2)
    out = torch.full((37, 96), float("nan"), dtype=dtype)
    assert dequantize_into(blocks, qtype, out) is out
    assert torch.equal(out, dequantize(blocks, qtype, 96).to(dtype))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_quantize_is_llama_cpps(qtype):
    w = torch.randn(5, 64)
    ours = quantize(w, qtype)
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType[qtype])
    assert torch.equal(ours, torch.from_numpy(theirs))
    assert (dequantize(ours, qtype, 64) - w).abs().max() < (0.02 if qtype == "Q8_0" else 0.3) * w.abs().max()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17])
@pytest.mark.parametrize("n, k", [(1, 32), (17, 576), (960, 1536)])
def test_kernel_equals_the_float_reference(qtype, rows, n, k):
    blocks = random_blocks(n, k, qtype, seed=rows * 31 + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
    want = x.double() @ dequantize(blocks, qtype, k).double().T
    got = qlinear(x, blocks, qtype, int8=False)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_leading_dimensions_and_the_build_are_kept():
    blocks = random_blocks(8, 64, "Q8_0", seed=3)
    x = torch.randn(2, 3, 64)
    assert qlinear(x, blocks, "Q8_0").shape == (2, 3, 8)
    assert extension() is extension()  # built once per process


def test_the_kernel_is_built_on_x86_64():
    if platform.machine() not in ("x86_64", "AMD64"):
        assert extension() is None  # elsewhere the float reference answers
        return
    assert extension() is not None, "kernels/cpu/qlinear.cpp did not build: is g++ installed (and ninja, a test dependency)?"
    assert extension().isa() in ("avx512", "avx2", "scalar")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the C++ kernel is built on x86-64 only")
def test_a_wrong_weight_width_is_refused():
    ext = extension()
    with pytest.raises(RuntimeError, match="bytes a row"):
        ext.qlinear(torch.randn(1, 64), random_blocks(4, 32, "Q8_0", seed=0), 8)
