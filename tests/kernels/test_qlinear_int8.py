"""The CPU kernel's int8-activation path (kernels/cpu/qlinear.cpp): each row of x is quantized to int8
32-blocks (d = max|x| / 127, q = round(x / d)) and multiplied with the weight blocks in integers
(AVX512-VNNI, or AVX2), as llama.cpp's q8_0 / q8_1 dot products.

Tolerance: rounding x to its block's grid moves each x_i by at most d / 2 = max|x_block| / 254, so an
output moves by at most sum over blocks of max|x_block| / 254 * sum |w| over the block; the rest is
fp32 summation (1e-5 of |x| @ |w|^T). That bound is checked per output, and on whole outputs the
error is ~1e-2 of the norm (below 2e-2 here), as llama.cpp's."""

from __future__ import annotations

import platform

import pytest
import torch
from test_qlinear import random_blocks

from loom.kernels.cpu import INT8_ENV, dequantize, extension, qlinear
from loom.runtime.layers.quantized import pack_panels, panels_available
from loom.runtime.model_executor.cpu_decode import CpuDecodeRunner
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.server_args import ServerArgs

from gguf_files import Q, write_gguf

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the C++ kernel is built on x86-64 only")


def assert_within_activation_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got ~ x @ w^T (w dequantised), off by no more than x's rounding to int8 blocks allows."""
    rows, k = x.shape
    want = x.double() @ w.double().T
    step = x.double().reshape(rows, k // 32, 32).abs().amax(-1) / 254  # [rows, blocks]: half a grid step
    mass = w.double().reshape(w.shape[0], k // 32, 32).abs().sum(-1)  # [n, blocks]
    bound = step @ mass.T + 1e-5 * (x.double().abs() @ w.double().abs().T) + 1e-6
    excess = ((got.double() - want).abs() - bound).max().item()
    assert excess <= 0, f"an output is {excess:.3g} past the int8 rounding bound"
    if want.numel() >= 16 * 17:
        assert (got.double() - want).norm() / want.norm() < 2e-2


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17, 64])
@pytest.mark.parametrize("n, k", [(1, 32), (17, 96), (45, 576), (67, 1568)])  # 1, 3, 18, 49 blocks a row
def test_int8_path_is_within_activation_rounding(qtype, rows, n, k):
    assert extension().int8_isa() in ("avx512_vnni", "avx2")
    blocks = random_blocks(n, k, qtype, seed=rows * 7 + n)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows + k))
    x[:, :32] *= 10  # an outlier block: its scale must not leak into the others
    got = qlinear(x, blocks, qtype, int8=True)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    assert_within_activation_rounding(got, x, dequantize(blocks, qtype, k))


def test_zero_and_exactly_representable_rows():
    """A zero block (scale 0) gives exactly 0, not NaN; integer x in [-127, 127] whose block maximum is 127
    is represented exactly, so the result is the float product."""
    blocks = random_blocks(33, 64, "Q4_1", seed=5)
    x = torch.randint(-127, 128, (3, 64), generator=torch.Generator().manual_seed(0)).float()
    x[:, 0], x[:, 32] = 127, -127
    x[1] = 0
    got = qlinear(x, blocks, "Q4_1", int8=True).double()
    want = x.double() @ dequantize(blocks, "Q4_1", 64).double().T
    assert torch.equal(got[1], torch.zeros(33, dtype=torch.float64))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_environment_selects_the_path(monkeypatch):
    """Unset or LOOM_CPU_INT8_ACT=1 gives the int8 path's numbers (the default); 0, the float path's."""
    blocks = random_blocks(40, 96, "Q4_0", seed=6)
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(6))
    monkeypatch.delenv(INT8_ENV, raising=False)
    assert torch.equal(qlinear(x, blocks, "Q4_0"), qlinear(x, blocks, "Q4_0", int8=True))
    monkeypatch.setenv(INT8_ENV, "1")
    assert torch.equal(qlinear(x, blocks, "Q4_0"), qlinear(x, blocks, "Q4_0", int8=True))
    monkeypatch.setenv(INT8_ENV, "0")
    assert torch.equal(qlinear(x, blocks, "Q4_0"), qlinear(x, blocks, "Q4_0", int8=False))
    assert not torch.equal(qlinear(x, blocks, "Q4_0", int8=True), qlinear(x, blocks, "Q4_0", int8=False))


@pytest.mark.slow
def test_the_avx2_build_gives_the_same_answers():
    """A second build without AVX-512 (its AVX2 maddubs path on this machine; a minute or two to compile):
    the float path equals the reference, the int8 path is within the same bound and agrees with the
    native build's to fp32 summation order (both compute the same integer dot products)."""
    avx2 = extension(without_avx512=True)
    assert avx2 is not None and avx2.isa() == "avx2" and avx2.int8_isa() == "avx2"
    for qtype, code in (("Q8_0", 8), ("Q4_0", 2), ("Q4_1", 3)):
        for rows, n, k in ((1, 45, 576), (9, 67, 1568), (17, 17, 96)):
            blocks = random_blocks(n, k, qtype, seed=rows + n)
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            w = dequantize(blocks, qtype, k)
            want = x.double() @ w.double().T
            exact = avx2.qlinear(x, blocks, code, False).double()
            torch.testing.assert_close(exact, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
            got = avx2.qlinear(x, blocks, code, True)
            assert_within_activation_rounding(got, x, w)
            native = extension().qlinear(x, blocks, code, True)
            torch.testing.assert_close(got, native, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_the_fused_decode_step_runs_its_layers_on_the_int8_path(tmp_path, monkeypatch):
    """The fused CPU decode step (decode.cpp) built with LOOM_CPU_INT8_ACT=1 quantizes x in every linear
    layer: its hidden states move off the float step's (not equal), by about what int8 activations
    cost through two layers of a random model (below 5e-2 of the norm). Its layers laid out in panels
    (where the CPU has AVX512-VNNI) give the same int8 step, to the float summation order."""
    path = write_gguf(tmp_path / "m.gguf", "llama", [Q.Q4_1, Q.Q8_0, Q.Q4_0], layers=2, seed=4)
    monkeypatch.setenv(INT8_ENV, "0")  # loaded in GGUF's block order (no panels)
    runner = ModelRunner(ServerArgs(model_path=str(path), quantization="auto", dtype="float32", max_total_tokens=256))
    table = runner.req_to_token_pool.req_to_token
    lens = [5, 1, 9]
    g = torch.Generator().manual_seed(1)
    for layer in range(runner.num_layers):  # earlier tokens' K and V
        for buf in (runner.token_to_kv_pool.k_buffer[layer], runner.token_to_kv_pool.v_buffer[layer]):
            buf.copy_(torch.randn(buf.shape, generator=g))
    start = 1
    for i, n in enumerate(lens):
        table[i, :n] = torch.arange(start, start + n)
        start += n
    hidden = torch.randn(len(lens), runner.model.model.norm.weight.shape[0], generator=g)
    args = (torch.tensor([n - 1 for n in lens]), torch.stack([table[i, n - 1] for i, n in enumerate(lens)]), table,
            torch.arange(len(lens)), torch.tensor(lens))  # fmt: skip
    out = {}
    for flag in ("0", "1"):
        monkeypatch.setenv(INT8_ENV, flag)
        out[flag] = CpuDecodeRunner._capture(runner).forward(hidden, *args)
    rel = ((out["1"] - out["0"]).norm() / out["0"].norm()).item()
    assert 0 < rel < 5e-2
    if panels_available():
        assert pack_panels(runner.model) == 4 * runner.num_layers  # qkv, o, gate_up, down
        panels = CpuDecodeRunner._capture(runner).forward(hidden, *args)
        torch.testing.assert_close(panels, out["1"], rtol=1e-4, atol=1e-4 * out["1"].abs().max().item())
