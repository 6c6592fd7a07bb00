"""Decode and prefill throughput against Transformers and the memory-bandwidth roofline, in one run.

For a random-weight Llama-shaped model (1B parameters by default, like Llama-3.2-1B), on the
device at hand (CUDA when there is one):

- decode tok/s at each `--batches` size: Loom (`LocalEngine`, the scheduler in this process, so
  the figure is the engine's and not the wire's) and Transformers `generate` on the same weights;
- the roofline: a decode step must read every weight and every cached K/V once, so at batch B
  it cannot beat B / ((weight bytes + B * KV bytes per sequence) / copy bandwidth), with the
  bandwidth measured here by a device-to-device copy;
- prefill tok/s (a batch of prompts, no decoding) for both.

Decode rates are (tokens of N steps - tokens of 1 step) / (time of N steps - time of 1 step), so
prefill and start-up do not count. Targets on a GPU: batch-1 decode >= 70 % of the
roofline; >= 3x Transformers at batch 32.

On CUDA, Loom runs twice by default, with decode CUDA graphs and without (`--cuda-graph both`),
and the table shows both side by side; the ratios to Transformers and the roofline use the run
with graphs. On the CPU there are no graphs, so Loom runs once.

    python benchmarks/bench_gpu.py                                  # on a GPU: 1B model, batches 1 32 128
    python benchmarks/bench_gpu.py --attention-backend triton       # the same on the Triton kernels
    python benchmarks/bench_gpu.py --disable-cuda-graph             # Loom without graphs only
    python benchmarks/bench_gpu.py --shape smollm2 --batches 1 8    # a CPU-sized smoke run
    python benchmarks/bench_gpu.py --qgemm                          # the quantized GEMM alone (CUDA)

`--qgemm` measures instead the Triton dequantise-GEMM (kernels/triton/qgemm.py) on Q8_0, Q4_0 and Q4_1
blocks against fp16 `torch.matmul` on the same layer shapes (SmolLM2-135M and Llama-7B: qkv, o,
gate_up, down, LM head) at 1, 16 and 256 rows, each timed as a CUDA graph replay (no Python launch
cost, as in the engine's decode graphs), with the weight bytes each reads and its largest error
against the torch reference.

Nothing here asserts a time: the figures are for reading.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

# (N, K) of each linear layer, for --qgemm.
QGEMM_SHAPES: dict[str, dict[str, tuple[int, int]]] = {
    "SmolLM2-135M": {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)},
    "Llama-7B": {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008),
                 "lm_head": (32000, 4096)},
}  # fmt: skip
QGEMM_ROWS = (1, 16, 256)

SHAPES: dict[str, dict[str, Any]] = {
    "1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True,
               rope_theta=500000.0, rms_norm_eps=1e-5),
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shape", choices=[*SHAPES, "smollm2"], default="1b", help="model shape (random weights, built once)")
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder instead of a random model")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU; on CPU bf16 where native, AVX512_BF16 or AMX, else fp32), bfloat16, float16 or float32")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128], help="decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence for decode")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps measured per batch")
    p.add_argument("--prefill-batch", type=int, default=8, help="prompts in the prefill measurement")
    p.add_argument("--prefill-len", type=int, default=1024, help="tokens per prompt in the prefill measurement")
    p.add_argument("--attention-backend", default="auto", choices=["auto", "flashinfer", "triton", "torch_native"],
                   help="Loom's attention backend (auto: flashinfer on CUDA when installed, else triton)")
    p.add_argument("--cuda-graph", choices=["both", "on", "off"], default="both",
                   help="Loom with decode CUDA graphs, without, or both side by side (CUDA only)")
    p.add_argument("--disable-cuda-graph", dest="cuda_graph", action="store_const", const="off",
                   help="the same as --cuda-graph off")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None, help="largest decode batch captured (default: Loom's)")
    p.add_argument("--skip-hf", action="store_true", help="Loom and the roofline only")
    p.add_argument("--qgemm", action="store_true", help="measure the quantized GEMM against fp16 matmul instead (CUDA)")
    return p.parse_args(argv)


def model_path(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    from loom.cache_dir import cache_dir
    from loom.checkpoint_writer import build_tiny_checkpoint
    from loom.demo_model import bench_model_path

    if args.shape == "smollm2":
        return bench_model_path()  # the one the CPU benchmarks share
    root = cache_dir() / f"bench-{args.shape}"
    if not (root / "config.json").exists() or not any(root.glob("*.safetensors")):
        print(f"building a {args.shape}-shaped random model in {root} (once) ...", file=sys.stderr)
        build_tiny_checkpoint(root, **SHAPES[args.shape])
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s a device-to-device copy reads (it also writes as much: count both, as the roofline's
    reads compete with nothing else)."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n * 4 / best


def prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (batch, length), generator=g).tolist()


def loom_rates(engine: Any, args: argparse.Namespace, vocab: int) -> tuple[dict[int, float], float]:
    def timed(ids: list[list[int]], steps: int) -> float:
        t0 = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params={"max_new_tokens": steps, "ignore_eos": True, "temperature": 0})
        return time.perf_counter() - t0

    decode = {}
    for b in tqdm(args.batches, desc="loom decode", file=sys.stderr):
        ids = prompts(b, args.prompt_len, vocab, seed=b)
        timed(ids[:1], 2)  # warm-up
        engine.flush_cache()
        t1 = timed(ids, 1)
        engine.flush_cache()
        tn = timed(ids, args.new_tokens)
        engine.flush_cache()
        decode[b] = b * (args.new_tokens - 1) / max(tn - t1, 1e-9)
    ids = prompts(args.prefill_batch, args.prefill_len, vocab, seed=7)
    t0 = time.perf_counter()
    engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0})
    prefill = args.prefill_batch * args.prefill_len / (time.perf_counter() - t0)
    engine.flush_cache()
    return decode, prefill


@torch.inference_mode()
def hf_rates(model: Any, args: argparse.Namespace, vocab: int, device: torch.device) -> tuple[dict[int, float], float]:
    def timed(ids: list[list[int]], steps: int) -> float:
        x = torch.tensor(ids, device=device)
        sync(device)
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        sync(device)
        return time.perf_counter() - t0

    decode = {}
    for b in tqdm(args.batches, desc="transformers decode", file=sys.stderr):
        ids = prompts(b, args.prompt_len, vocab, seed=b)
        timed(ids[:1], 2)
        t1, tn = timed(ids, 1), timed(ids, args.new_tokens)
        decode[b] = b * (args.new_tokens - 1) / max(tn - t1, 1e-9)
    x = torch.tensor(prompts(args.prefill_batch, args.prefill_len, vocab, seed=7), device=device)
    sync(device)
    t0 = time.perf_counter()
    model(x)
    sync(device)
    prefill = x.numel() / (time.perf_counter() - t0)
    return decode, prefill


def gpu_time_us(fn: Any) -> float:
    """Median microseconds of one call of `fn`, replayed from a CUDA graph (plain launches if it cannot be captured)."""
    import triton.testing

    try:
        return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")
    except Exception:  # noqa: BLE001 - a capture failure only changes how the time is taken
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def random_blocks(n: int, k: int, qtype: str, device: torch.device) -> torch.Tensor:
    """Random valid blocks (finite fp16 scales and minimums) of an [n, k] weight, on `device`."""
    from loom.kernels.cpu import BLOCK_BYTES

    blocks = torch.randint(0, 256, (n, k // 32, BLOCK_BYTES[qtype]), dtype=torch.uint8, device=device)
    blocks[..., 0:2] = (torch.rand(n, k // 32, 1, device=device) * 0.02 + 0.001).half().view(torch.uint8)
    if qtype == "Q4_1":
        blocks[..., 2:4] = ((torch.rand(n, k // 32, 1, device=device) - 0.5) * 0.1).half().view(torch.uint8)
    return blocks.reshape(n, -1)


@torch.inference_mode()
def qgemm_table(device: torch.device) -> int:
    """--qgemm: the Triton quantized GEMM against fp16 torch.matmul, per layer shape and row count."""
    from loom.kernels.triton import qgemm, qgemm_torch

    qtypes = ("Q8_0", "Q4_0", "Q4_1")
    print(f"\n## Quantized GEMM (Triton) vs fp16 torch.matmul on {torch.cuda.get_device_name(device)}\n")
    print("x fp16 [M, K]; µs per call (CUDA graph replay, median; a weight smaller than L2 stays there across replays); "
          "GB/s: weight bytes read per second; err: largest |qgemm - reference| / largest |reference|\n")  # fmt: skip
    head = " | ".join(f"{q} µs | {q} GB/s | fp16 / {q}" for q in qtypes)
    print(f"| model | layer | N x K | M | fp16 µs | fp16 GB/s | {head} | err |")
    print("|---|---|---|---:|" + "---:|" * (2 + 3 * len(qtypes) + 1))
    for model, layers in QGEMM_SHAPES.items():
        for layer, (n, k) in layers.items():
            weight = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
            blocks = {q: random_blocks(n, k, q, device) for q in qtypes}
            for m in QGEMM_ROWS:
                x = torch.randn(m, k, device=device, dtype=torch.float16)
                fp16_us = gpu_time_us(lambda: torch.matmul(x, weight.T))
                cells, err = [], 0.0
                for q in qtypes:
                    ref = qgemm_torch(x, blocks[q], q).float()
                    err = max(err, ((qgemm(x, blocks[q], q).float() - ref).abs().max() / ref.abs().max()).item())
                    us = gpu_time_us(lambda q=q: qgemm(x, blocks[q], q))
                    cells.append(f"{us:.1f} | {blocks[q].numel() / us / 1e3:.0f} | {fp16_us / us:.2f}x")
                print(f"| {model} | {layer} | {n} x {k} | {m} | {fp16_us:.1f} | {weight.numel() * 2 / fp16_us / 1e3:.0f} | "
                      f"{' | '.join(cells)} | {err:.1e} |")  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.qgemm:
        from loom.runtime.model_executor.device import resolve_device

        device = resolve_device(args.device)
        if device.type != "cuda":
            print("--qgemm measures the Triton kernel on a CUDA device, and there is none here: nothing measured",
                  file=sys.stderr)  # fmt: skip
            return 1
        return qgemm_table(device)
    from loom.runtime.entrypoints.engine import LocalEngine
    from loom.runtime.model_executor.device import resolve_device, resolve_dtype
    from loom.runtime.models.loader import load_config

    from hf_reference import hf_model

    path = model_path(args)
    device = resolve_device(args.device)
    config = load_config(path)
    dtype = resolve_dtype(args.dtype, device, config)
    dtype_name = str(dtype).removeprefix("torch.")
    bandwidth = copy_bandwidth(device)
    max_batch = max(max(args.batches), args.prefill_batch)
    context = args.prompt_len + args.new_tokens
    slots = max(max_batch * max(context, args.prefill_len) + 256, 4096)
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.cuda_graph] if device.type == "cuda" else [False]
    loom: dict[bool, tuple[dict[int, float], float]] = {}  # graphs on? -> (decode tok/s per batch, prefill tok/s)
    backend_name, graph_sizes = args.attention_backend, None
    for graphs in settings:
        with LocalEngine(model_path=str(path), dtype=dtype_name, device=device.type, max_total_tokens=slots,
                         max_running_requests=max_batch, chunked_prefill_size=-1, max_prefill_tokens=max(slots, 16384),
                         attention_backend=args.attention_backend, disable_cuda_graph=not graphs,
                         cuda_graph_max_bs=args.cuda_graph_max_bs) as engine:  # fmt: skip
            runner = engine.model_runner
            weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
            kv_per_token = runner.token_to_kv_pool.bytes_per_token(
                runner.kv_dtype, runner.num_kv_heads, runner.head_dim, runner.num_layers)  # fmt: skip
            vocab = runner.vocab_size
            backend_name = type(runner.attn_backend).__name__
            if runner.cuda_graph_runner is not None:
                graph_sizes = runner.cuda_graph_runner.batch_sizes
            loom[graphs] = loom_rates(engine, args, vocab)
    hf_decode: dict[int, float] = {}
    hf_prefill = float("nan")
    if not args.skip_hf:
        model = hf_model(path, dtype).to(device)
        hf_decode, hf_prefill = hf_rates(model, args, vocab, device)
        del model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n## Decode and prefill on {name}\n")
    graph_note = f"decode CUDA graphs for batch sizes {graph_sizes[0]}..{graph_sizes[-1]}" if graph_sizes else "no CUDA graphs"
    print(f"model {path} ({weight_bytes / 1e9:.2f} GB of {dtype_name} weights), prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} decode steps; attention backend {args.attention_backend} ({backend_name}); {graph_note}; "
          f"measured copy bandwidth {bandwidth / 1e9:.1f} GB/s\n")  # fmt: skip
    label = {True: "Loom graphs tok/s", False: "Loom eager tok/s" if device.type == "cuda" else "Loom tok/s"}
    main_run = loom[settings[0]]  # with graphs when they ran
    extra = [label[g] for g in settings]
    print(f"| batch | {' | '.join(extra)} | Transformers tok/s | Loom / HF | roofline tok/s | Loom % of roofline |")
    print("|---:|" + "---:|" * (len(extra) + 4))
    for b in args.batches:
        kv_read = b * kv_per_token * (args.prompt_len + args.new_tokens / 2)  # mean context over the steps
        roof = b / ((weight_bytes + kv_read) / bandwidth)
        hf = hf_decode.get(b, float("nan"))
        rates = " | ".join(f"{loom[g][0][b]:.1f}" for g in settings)
        best = main_run[0][b]
        print(f"| {b} | {rates} | {hf:.1f} | {best / hf:.2f}x | {roof:.1f} | {100 * best / roof:.0f} % |")
    if len(settings) == 2:
        speedups = ", ".join(f"batch {b}: {loom[True][0][b] / loom[False][0][b]:.2f}x" for b in args.batches)
        print(f"\nCUDA graphs vs eager decode: {speedups}")
    for g in settings:
        prefill = loom[g][1]
        print(f"\nprefill ({args.prefill_batch} x {args.prefill_len} tokens, {label[g].removesuffix(' tok/s')}): "
              f"Loom {prefill:.0f} tok/s, Transformers {hf_prefill:.0f} tok/s ({prefill / hf_prefill:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
