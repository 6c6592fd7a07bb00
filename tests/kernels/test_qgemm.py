"""The Triton dequantise-GEMM (kernels/triton/qgemm.py) against its torch reference, under Triton's
interpreter on the CPU (on a GPU when there is one): Q8_0, Q4_0 and Q4_1 blocks, 1 to 64 rows, odd
output counts, K a multiple of 32 but not of the tile, split K, bias; and quantized layers and the LM
head on the test device (the Triton kernel on CUDA) computing the same."""

from __future__ import annotations

import pytest
import torch

from loom.kernels.cpu import BLOCK_BYTES, dequantize
from loom.runtime.layers.embedding import ParallelLMHead
from loom.runtime.layers.linear import ReplicatedLinear
from loom.runtime.layers.quantized import runs_on
from loom.runtime.models.loader import quantize_layers

from triton_setup import CUDA, DEVICE, DTYPES, TOL, interpreter, kt  # noqa: F401  (interpreter: autouse fixture)

pytestmark = pytest.mark.usefixtures("float_activations")  # held to the float reference (conftest.py)

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]


def random_blocks(n: int, k: int, qtype: str, seed: int) -> torch.Tensor:
    """Valid blocks: finite fp16 scales (and Q4_1 minimums), quants over their whole range."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, BLOCK_BYTES[qtype]), dtype=torch.uint8, generator=g)
    blocks[..., 0:2] = (torch.rand(n, k // 32, 1, generator=g) * 0.02 + 0.001).half().view(torch.uint8)
    if qtype == "Q4_1":
        blocks[..., 2:4] = ((torch.rand(n, k // 32, 1, generator=g) - 0.5) * 0.1).half().view(torch.uint8)
    return blocks.reshape(n, -1).contiguous().to(DEVICE)


def check(got: torch.Tensor, x: torch.Tensor, blocks: torch.Tensor, qtype: str, bias: torch.Tensor | None = None,
          tol: float | None = None) -> None:  # fmt: skip
    """got equals x @ dequant(blocks)^T (+ bias), computed in fp64, within `tol` (the dtype's) of the largest output."""
    want = x.double() @ dequantize(blocks, qtype, x.shape[-1]).double().T
    if bias is not None:
        want += bias.double()
    assert got.dtype == x.dtype and got.shape == want.shape
    tol = TOL[x.dtype] if tol is None else tol
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 16, 17, 33, 64])  # the GEMV, and tl.dot tiles of 16, 32 and 64 rows
def test_qgemm_equals_the_reference(dtype, qtype, rows) -> None:
    n, k = 37, 96  # odd N; K: 3 blocks, not a multiple of any tile (64 or 128 features)
    blocks = random_blocks(n, k, qtype, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(DEVICE, dtype)
    got = kt.qgemm(x, blocks, qtype)
    check(got, x, blocks, qtype)
    ref = kt.qgemm_torch(x, blocks, qtype)
    torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows, gemv, split_k", [(1, True, 2), (5, True, 1), (3, False, 2), (20, False, 3)])
def test_split_k_bias_and_both_kernels_at_any_row_count(qtype, rows, gemv, split_k) -> None:
    n, k = 19, 320  # 10 blocks: two GEMV steps of 8 blocks, five tl.dot steps of 2
    blocks = random_blocks(n, k, qtype, seed=n + rows)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=gen).to(DEVICE)
    bias = torch.randn(n, generator=gen).to(DEVICE)
    check(kt.qgemm(x, blocks, qtype, bias, split_k=split_k, gemv=gemv), x, blocks, qtype, bias)


def test_leading_dimensions_row_strides_and_empty_batches() -> None:
    blocks = random_blocks(11, 64, "Q4_1", seed=3)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = kt.qgemm(x, blocks, "Q4_1")
    assert got.shape == (2, 3, 11)
    check(got.reshape(6, 11), x.reshape(6, 64), blocks, "Q4_1")
    wide = torch.randn(4, 100, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    check(kt.qgemm(wide[:, :64], blocks, "Q4_1"), wide[:, :64], blocks, "Q4_1")  # rows 100 apart, not 64
    assert kt.qgemm(x[:0], blocks, "Q4_1").shape == (0, 3, 11)
    with pytest.raises(AssertionError, match="uint8"):
        kt.qgemm(torch.randn(1, 96).to(DEVICE), blocks, "Q4_1")  # 64 features' blocks for 96 features


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantized_layers_and_lm_head_on_the_device(qtype) -> None:
    """A layer quantized where it lives keeps its blocks there and computes x @ dequant(blocks)^T + bias
    (on CUDA through the Triton kernel, on the CPU through the CPU's, tested to 1e-4 in test_qlinear.py);
    the LM head's dense and sparse logits likewise."""
    gen = torch.Generator().manual_seed(7)
    layer = ReplicatedLinear(96, 45, bias=True)
    layer.weight.copy_(torch.randn(45, 96, generator=gen) * 0.1)
    layer.bias.copy_(torch.randn(45, generator=gen))
    layer = layer.to(DEVICE)
    assert layer.quantize_(qtype) and layer.qweight.device.type == DEVICE and layer.weight is None
    for rows in (1, 4):
        x = torch.randn(rows, 96, generator=gen).to(DEVICE)
        check(layer(x), x, layer.qweight, qtype, layer.bias, tol=1e-4)
    head = ParallelLMHead(70, 64)
    head.weight.copy_(torch.randn(70, 64, generator=gen))
    head = head.to(DEVICE)
    assert head.quantize_(qtype) and head.qweight.device.type == DEVICE
    hidden = torch.randn(3, 64, generator=gen).to(DEVICE)
    logits = head.compute_logits(hidden)
    check(logits, hidden, head.qweight, qtype, tol=1e-4)
    ids = torch.tensor([0, 9, 69], device=DEVICE)
    torch.testing.assert_close(head.logits_for_ids(hidden[1], ids), logits[1, ids], rtol=1e-4, atol=1e-4 * logits.abs().max().item())


def test_quantization_runs_on_cuda_and_says_where_it_does_not() -> None:
    assert runs_on(torch.device("cpu")) and runs_on(torch.device("cuda"))  # triton is installed here
    assert not runs_on(torch.device("meta"))
    with pytest.raises(ValueError, match="runs on the CPU, or on CUDA with triton installed; use 'none' on meta"):
        quantize_layers(torch.nn.Module(), "int8", {}, torch.device("meta"))
    assert quantize_layers(torch.nn.Module(), "auto", {}, torch.device("meta"))["layers"] == {}  # auto: left float
