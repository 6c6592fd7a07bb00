"""CPU fp32 linear layers: the plain weight (`skinny_linear` / `F.linear`) vs oneDNN's blocked copy (`pack_cpu_weights`).

The body of a SmolLM2-135M-shaped model: `--layers` layers of qkv [960 x 576], o [576 x 576],
gate_up [3072 x 576] and down [576 x 1536], each with its own weights so that they are read from
memory as in a real forward pass, plus the LM head [49152 x 576]. Times are per pass over all
layers, the best of `--repeats` after a warm-up pass.

    python benchmarks/bench_linear.py                    # rows 1, 4, 5, 8, 16, 40, 256, 1024
    python benchmarks/bench_linear.py --rows 16 --threads 1
"""

from __future__ import annotations

import argparse
import time

import torch

from loom.runtime.layers.linear import PACKED_MIN_ROWS, RowParallelLinear, pack_cpu_weights

BODY = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # (out, in) per layer
HEAD = (49152, 576)


def timed(layers: list[RowParallelLinear], rows: int, repeats: int) -> float:
    inputs = {n: torch.randn(rows, n) for n in {layer.weight.shape[1] for layer in layers}}
    best = float("inf")
    with torch.inference_mode():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            for layer in layers:
                layer(inputs[layer.weight.shape[1]])
            if i:  # the first pass warms up
                best = min(best, time.perf_counter() - t0)
    return best


def build(shapes: list[tuple[int, int]]) -> list[RowParallelLinear]:
    layers = [RowParallelLinear(i, o) for o, i in shapes]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.02)
    return layers


def layer_args(parser: argparse.ArgumentParser, rows: list[int], argv: list[str] | None) -> argparse.Namespace:
    """--rows, --layers, --repeats and --threads (applied), as this benchmark and bench_qlinear.py take them."""
    parser.add_argument("--rows", type=int, nargs="+", default=rows)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = layer_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]), [1, 4, 5, 8, 16, 40, 256, 1024], argv)
    plain = {"body": build(list(BODY) * args.layers), "LM head": build([HEAD])}
    packed = {"body": build(list(BODY) * args.layers), "LM head": build([HEAD])}
    for part in packed.values():
        for layer in part:
            pack_cpu_weights(layer)
    print(f"CPU fp32, {torch.get_num_threads()} threads; packed weights are used from {PACKED_MIN_ROWS} rows\n")
    print("| part | rows | plain weight | packed weight | speed-up |")
    print("|---|---|---|---|---|")
    for part in plain:
        for rows in args.rows:
            a, b = timed(plain[part], rows, args.repeats), timed(packed[part], rows, args.repeats)
            print(f"| {part} | {rows} | {a * 1e3:.1f} ms | {b * 1e3:.1f} ms | {a / b:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
