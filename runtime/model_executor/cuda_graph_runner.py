"""CUDA graphs for decode steps, as SGLang's CudaGraphRunner.

A decode step of a small model is mostly kernel-launch overhead: hundreds of small kernels whose
launches cost more than their work. Capturing the step once per batch size in a CUDA graph and
replaying it launches them all at once.

What is captured: the model's forward up to the final-norm hidden states [bs, hidden] (what
`ModelRunner.forward` returns). The LM head stays outside: it is one large matmul (launch cost
negligible), and the scheduler computes logits on the rows it needs, as after an extend.

Fixed input tensors (`input_ids`, `positions`, `out_cache_loc`, `req_pool_indices`, `seq_lens`,
`max_bs` rows each) are what every graph reads. A batch of `b` rows replays the graph of the
smallest captured size `bs >= b`: its rows are copied into the first `b` rows of the fixed tensors
and the rows `b..bs` are padding, which cannot touch a real request's KV:

- a padding row stores its K/V in slot 0, the pool's reserved slot (`out_cache_loc = 0`);
- it attends one token (`seq_lens = 1`) through row 0 of `req_to_token`, read only;
- its output rows are cut off before they are returned.

How a graph is made is pluggable (`graph_factory`): `CudaGraph` captures on the GPU; `EagerGraph`
keeps the same contract without a GPU (replay re-runs the captured callable over the fixed tensors),
so the padding and the fixed-buffer plumbing are tested on the CPU.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger(__name__)

# Largest decode batch captured by default (capped by max_running_requests).
DEFAULT_MAX_BS = 160
# Warm-up runs before a capture: the first run compiles and loads the kernels (Triton's JIT, cuBLAS
# handles), which must not happen while capturing.
WARMUP_RUNS = 2


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to `max_bs`, and `max_bs` itself."""
    assert max_bs >= 1, f"max_bs must be >= 1, got {max_bs}"
    sizes = [s for s in (1, 2, 4, 8, *range(16, max_bs + 1, 8)) if s <= max_bs]
    return sizes if sizes[-1] == max_bs else [*sizes, max_bs]


class GraphedRunner(Protocol):
    """What the graph runner reads of the model runner that owns it."""

    model: Any
    attn_backend: Any
    device: torch.device
    req_to_token_pool: Any


class Graph(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Capture `fn` (which reads only fixed tensors) -> its output tensor, refreshed by each replay."""
        ...

    def replay(self) -> None: ...


class CudaGraph:
    """A `torch.cuda.CUDAGraph`; a runner's graphs share one memory pool and capture stream."""

    def __init__(self, pool: tuple[int, int], stream: torch.cuda.Stream) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.stream = stream

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        device = self.stream.device
        with torch.cuda.device(device):  # this runner's GPU, whichever is current (data-parallel replicas)
            self.stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(self.stream):
                for _ in range(WARMUP_RUNS):
                    fn()
            torch.cuda.synchronize(device)
            with torch.cuda.graph(self.graph, pool=self.pool, stream=self.stream):
                out = fn()
            torch.cuda.synchronize(device)
        return out

    def replay(self) -> None:
        with torch.cuda.device(self.stream.device):  # launch on this GPU's current stream, behind the input copies
            self.graph.replay()


class EagerGraph:
    """The `Graph` contract without a GPU: replay re-runs the captured callable over the fixed tensors
    and copies its result into the tensor `capture` returned (for tests on the CPU)."""

    def __init__(self) -> None:
        self._fn: Callable[[], torch.Tensor] | None = None
        self._out: torch.Tensor | None = None

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        self._fn, self._out = fn, fn()
        return self._out

    def replay(self) -> None:
        assert self._fn is not None and self._out is not None, "replay before capture"
        self._out.copy_(self._fn())


class CudaGraphRunner:
    """Captures the decode forward of `model_runner` for each of `batch_sizes` and replays it.

    The attention backend must support graphs (`supports_cuda_graph`); the runner calls its
    `init_cuda_graph_state` once, `init_forward_metadata_capture` before each capture and
    `init_forward_metadata_replay` before each replay."""

    def __init__(
        self,
        model_runner: GraphedRunner,
        batch_sizes: list[int],
        graph_factory: Callable[[], Graph] | None = None,
    ) -> None:
        backend = model_runner.attn_backend
        assert backend.supports_cuda_graph, f"{type(backend).__name__} does not support CUDA graphs"
        self.model_runner = model_runner
        self.batch_sizes = sorted(set(batch_sizes))
        self.max_bs = self.batch_sizes[-1]
        device, i64 = model_runner.device, torch.int64
        # The fixed inputs every graph reads; their initial values are those of a padding row.
        self.input_ids = torch.zeros(self.max_bs, dtype=i64, device=device)
        self.positions = torch.zeros(self.max_bs, dtype=i64, device=device)
        self.out_cache_loc = torch.zeros(self.max_bs, dtype=i64, device=device)  # slot 0: the reserved slot
        self.req_pool_indices = torch.zeros(self.max_bs, dtype=i64, device=device)  # row 0, only ever read
        self.seq_lens = torch.ones(self.max_bs, dtype=i64, device=device)
        backend.init_cuda_graph_state(self.max_bs, model_runner.req_to_token_pool.max_context_len)
        if graph_factory is None:
            with torch.cuda.device(device):
                pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
            graph_factory = lambda: CudaGraph(pool, stream)  # noqa: E731
        self.batches: dict[int, ForwardBatch] = {}
        self.graphs: dict[int, Graph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [bs, hidden] per graph, refreshed by replay
        self._capture_all(graph_factory)

    def _static_batch(self, bs: int) -> ForwardBatch:
        """A decode batch of `bs` rows over the fixed tensors (the first `bs` rows of each)."""
        mr = self.model_runner
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            batch_size=bs,
            input_ids=self.input_ids[:bs],
            positions=self.positions[:bs],
            out_cache_loc=self.out_cache_loc[:bs],
            req_pool_indices=self.req_pool_indices[:bs],
            seq_lens=self.seq_lens[:bs],
            seq_lens_cpu=[1] * bs,
            req_to_token_pool=mr.req_to_token_pool,
            token_to_kv_pool=mr.token_to_kv_pool,
            attn_backend=mr.attn_backend,
        )

    @torch.inference_mode()
    def _capture_all(self, graph_factory: Callable[[], Graph]) -> None:
        model, backend = self.model_runner.model, self.model_runner.attn_backend
        start = time.perf_counter()
        # Largest first: the smaller graphs then fit in the memory the larger ones left in the shared pool.
        for bs in reversed(self.batch_sizes):
            fb = self._static_batch(bs)
            backend.init_forward_metadata_capture(fb)
            graph = graph_factory()
            self.outputs[bs] = graph.capture(lambda fb=fb: model(fb.input_ids, fb.positions, fb))
            self.batches[bs], self.graphs[bs] = fb, graph
        logger.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s",
            len(self.batch_sizes), self.batch_sizes, time.perf_counter() - start,
        )  # fmt: skip

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.is_decode and 0 < fb.batch_size <= self.max_bs

    def padded_size(self, batch_size: int) -> int:
        """The captured size a batch of `batch_size` rows replays (the smallest one that holds it)."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, batch_size)]

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """Run decode batch `fb` (its tensors on the runner's device) through the graph of the next
        captured size -> hidden states [fb.batch_size, hidden] (a copy: the next replay reuses the graph's)."""
        b = fb.batch_size
        bs = self.padded_size(b)
        if bs > b:  # rows b..bs may hold an earlier, larger batch's rows: make them padding again
            for buf in (self.input_ids, self.positions, self.out_cache_loc, self.req_pool_indices):
                buf[b:bs].zero_()
            self.seq_lens[b:bs].fill_(1)
        self.input_ids[:b].copy_(fb.input_ids, non_blocking=True)
        self.positions[:b].copy_(fb.positions, non_blocking=True)
        self.out_cache_loc[:b].copy_(fb.out_cache_loc, non_blocking=True)
        self.req_pool_indices[:b].copy_(fb.req_pool_indices, non_blocking=True)
        self.seq_lens[:b].copy_(fb.seq_lens, non_blocking=True)
        static = self.batches[bs]
        static.seq_lens_cpu = [*fb.seq_lens_cpu, *[1] * (bs - b)]
        self.model_runner.attn_backend.init_forward_metadata_replay(static)
        self.graphs[bs].replay()
        return self.outputs[bs][:b].clone()
