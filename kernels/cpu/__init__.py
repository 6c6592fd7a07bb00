"""CPU kernels built from C++ on first use: weight-only quantized linear layers (`qlinear`), and a
Llama-family decode step in one call over those layers (`DecodeModel`, decode.cpp; driven by
runtime/model_executor/cpu_decode.py).

By default (`int8_activations`; `LOOM_CPU_INT8_ACT=0` turns it off) the kernels quantize x to int8
32-blocks and use integer dot products (AVX512-VNNI, or AVX2), as llama.cpp does: ~1.5x faster a
matmul at 1-16 rows, and ahead of dequantised float bands up to ~100 (layers/quantized.py); ~1e-2
relative error a layer. With it off (or on a CPU with neither) x stays in fp32, exact to the
summation order: what tests that compare with the float model use. Where the build has AVX512-VNNI
and int8 activations are on when a model loads, its layers are laid out in panels (`panels.py`,
`panels.cpp`), whose kernel always quantizes x: turning the variable off later does not change them.

The extension is compiled with the machine's own instruction set (`-march=native`: AVX-512 where
the CPU has it, else AVX2, else plain C++) by `torch.utils.cpp_extension` the first time a process
asks for it, and cached under torch's extensions folder by a name that carries the CPU's flags
and the versions, so a home folder shared by different machines never loads a wrong build. A build
killed half-way (a CI job cut off) leaves torch's `lock` file behind, on which torch would wait
forever: builds here hold an flock as well, which dies with its process, and under it such a file
can only be stale and is removed (`_exclusive_build`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pathlib
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

HERE = pathlib.Path(__file__).resolve().parent
# GGUF's type ids of the block formats the kernel reads.
QTYPES = {"Q8_0": 8, "Q4_0": 2, "Q4_1": 3}
PANELS = 0x100  # QTYPES[t] | PANELS: blocks laid out in panels of 16 output rows (panels.py, panels.cpp)
BLOCK = 32
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}
INT8_ENV = "LOOM_CPU_INT8_ACT"  # "0": x stays fp32 (exact); else x in int8 blocks (faster, ~1e-2 relative error)


def _cpu_flags() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def int8_activations() -> bool:
    """Whether the kernels quantize x to int8 blocks: yes unless `LOOM_CPU_INT8_ACT=0` (llama.cpp's
    arithmetic, and its speed: the fused decode step measured 1.7x faster at one row, 1.5x at 16).
    Tests that hold the kernels to the float reference (1e-4) or to the float model's greedy tokens
    turn it off; tests/kernels/test_qlinear_int8.py bounds its error."""
    return os.environ.get(INT8_ENV, "1") != "0"


def _build_spec(without_avx512: bool = False) -> tuple[str, list[pathlib.Path], list[str]]:
    """(name, sources, compiler flags) of a build; the name carries everything the build depends on."""
    sources = [HERE / "qlinear.cpp", HERE / "decode.cpp", HERE / "panels.cpp"]
    flags = ["-O3", "-march=native", "-fopenmp"] + (["-mno-avx512f"] if without_avx512 else [])
    code = "|".join(f.read_bytes().hex() for f in [*sources, HERE / "qlinear.h"])
    key = hashlib.sha256(f"{_cpu_flags()}|{torch.__version__}|{flags}|{code}".encode()).hexdigest()[:12]
    return f"loom_qlinear_{key}", sources, flags


def _build_directory(name: str) -> pathlib.Path:
    """Where torch.utils.cpp_extension would build `name` on a CPU build of torch (given explicitly, so
    that `_exclusive_build` knows the folder)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root

        abi = getattr(sys, "abiflags", "")
        root = os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}{abi}_cpu")
    return pathlib.Path(root) / name


@contextlib.contextmanager
def _exclusive_build(build_dir: pathlib.Path) -> Iterator[None]:
    """Held around torch's build in `build_dir`: an exclusive flock, which the OS releases when its
    process ends however it ends. Every Loom build of this folder holds it, so a torch `lock` file
    found under it was left by a build that was killed, and is removed (torch's own lock is a bare
    file, and torch waits on one for ever)."""
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock on this OS: torch's lock alone
        yield
        return
    with open(build_dir / "loom.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            logger.warning("removing %s, left by a build of the CPU kernels that was stopped", stale)
            stale.unlink(missing_ok=True)
        yield


@functools.cache
def extension(without_avx512: bool = False) -> Any | None:
    """The compiled extension, or None where it cannot be built (no x86-64, no compiler).
    `without_avx512`: a second build that leaves AVX-512 out (its AVX2 code, on this machine; tests)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    from torch.utils.cpp_extension import load

    name, sources, flags = _build_spec(without_avx512)
    folder = _build_directory(name)
    t0 = time.perf_counter()
    try:
        with _exclusive_build(folder):
            module = load(name=name, sources=[str(f) for f in sources], build_directory=str(folder),
                          extra_cflags=flags, extra_include_paths=[str(HERE)], verbose=False)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the fallback
        logger.warning("the quantized CPU kernels could not be built (%s); dequantising per call instead", exc)
        return None
    logger.info("quantized CPU kernels ready (%s, int8 activations: %s) in %.1fs", module.isa(), module.int8_isa() or "no",
                time.perf_counter() - t0)  # fmt: skip
    return module


def dequantize(blocks: torch.Tensor, qtype: str, cols: int) -> torch.Tensor:
    """[N, cols / 32 * block bytes] uint8 -> [N, cols] float32: the reference the kernel must equal."""
    b = blocks.reshape(blocks.shape[0], cols // BLOCK, BLOCK_BYTES[qtype])
    d = b[..., 0:2].contiguous().view(torch.float16).float()
    if qtype == "Q8_0":
        return (d * b[..., 2:].contiguous().view(torch.int8).float()).reshape(-1, cols)
    qs = b[..., 4:] if qtype == "Q4_1" else b[..., 2:]
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()
    if qtype == "Q4_0":
        return (d * (nibbles - 8)).reshape(-1, cols)
    m = b[..., 2:4].contiguous().view(torch.float16).float()
    return (d * nibbles + m).reshape(-1, cols)


def dequantize_into(blocks: torch.Tensor, qtype: str, out: torch.Tensor) -> torch.Tensor:
    """out [N, cols] (float32 or bfloat16, contiguous) = dequant(blocks [N, cols / 32 * block bytes]),
    by the extension's threads where it is built (the torch reference is several passes over it)."""
    ext = extension()
    if ext is None or out.dtype not in (torch.float32, torch.bfloat16):
        out.copy_(dequantize(blocks, qtype, out.shape[1]))
    else:
        ext.dequantize_into(blocks, QTYPES[qtype], out)
    return out


def qlinear(x: torch.Tensor, blocks: torch.Tensor, qtype: str, int8: bool | None = None, panels: bool = False) -> torch.Tensor:
    """x [..., K] float32 @ dequant(blocks)^T -> [..., N]; blocks [N, K / 32 * block bytes] uint8.
    `int8` (default: int8_activations()): x quantized to int8 32-blocks, as llama.cpp does, where the
    extension has that path; about 1e-2 of the row's norm off the float product, several times faster.
    `panels`: blocks laid out by `panels.to_panels` (the panel kernel, which always quantizes x)."""
    ext = extension()
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    if ext is None:
        if panels:
            raise RuntimeError("blocks in panels need the panel kernel (an AVX512-VNNI build of kernels/cpu)")
        y = x2 @ dequantize(blocks, qtype, shape[-1]).T
    elif panels:  # (a build without the panel kernel refuses them)
        y = ext.qlinear(x2, blocks, QTYPES[qtype] | PANELS, True)
    else:
        y = ext.qlinear(x2, blocks, QTYPES[qtype], int8_activations() if int8 is None else int8)
    return y.reshape(*shape[:-1], blocks.shape[0])


def quantize(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    """float [N, K] -> GGUF blocks [N, K / 32 * block bytes] uint8 (Q8_0 or Q4_0, as llama.cpp rounds)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    data = gguf_quantize(weight.detach().float().cpu().numpy().astype(np.float32), GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(data))
