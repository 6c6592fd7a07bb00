"""Loads the model, owns the KV pools and the attention backend, runs one forward pass."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch

from loom.kernels.attention import create_attention_backend
from loom.radix_cache import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator
from loom.runtime.layers.linear import pack_cpu_weights
from loom.runtime.layers.quantized import pack_panels
from loom.runtime.model_executor.cpu_decode import CpuDecodeRunner, unsupported
from loom.runtime.model_executor.cuda_graph_runner import DEFAULT_MAX_BS, CudaGraphRunner, capture_batch_sizes
from loom.runtime.model_executor.device import resolve_device, resolve_dtype, to_device
from loom.runtime.model_executor.forward_batch import ForwardBatch
from loom.runtime.model_executor.sampling import ScratchRows
from loom.runtime.models.loader import load_config, load_model
from loom.runtime.server_args import ServerArgs

if TYPE_CHECKING:
    from loom.runtime.model_executor.distributed import TpGroup

logger = logging.getLogger(__name__)

# Without a --max-total-tokens the pool is sized from memory, up to this many slots on CPU.
CPU_MAX_DEFAULT_TOKENS = 1 << 18

def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError):
        return 8 << 30


class ModelRunner:
    def __init__(self, args: ServerArgs, tp: TpGroup | None = None) -> None:
        """tp: this process's tensor-parallel rank (None: a single rank). The model then holds only
        this rank's shard of the weights, and the KV pool only this rank's KV heads."""
        if args.tp_size > 1 and tp is None:
            raise ValueError(
                f"tp_size={args.tp_size} runs one scheduler process per rank: serve it with `loom serve --tp-size "
                f"{args.tp_size}` (or loom.Runtime / ProcessEngine), not in-process"
            )
        self.args = args
        self.tp_rank, self.tp_size = (tp.rank, tp.size) if tp else (0, 1)
        self.device = tp.device if tp else resolve_device(args.device, args.base_gpu_id)
        if args.random_seed is not None:
            torch.manual_seed(args.random_seed)
        config = load_config(args.model_path)
        self.dtype = resolve_dtype(args.dtype, self.device, config)
        self.model, self.hf_config = load_model(
            args.model_path, self.dtype, device=self.device, tp_rank=self.tp_rank, tp_size=self.tp_size,
            quantization=args.quantization,
        )
        if self.device.type == "cpu" and not args.disable_cpu_weight_packing:
            panels = pack_panels(self.model)  # the same bytes in another order: nothing added
            if panels:
                logger.info("%d quantized linear layers laid out in panels for the AVX512-VNNI kernel", panels)
            added = pack_cpu_weights(self.model) if self.dtype == torch.float32 else 0  # before the KV pool takes its share
            if added:
                logger.info("linear weights packed for oneDNN: %.1f MiB more (--disable-cpu-weight-packing to skip)", added / 2**20)
        cfg = self.hf_config
        self.vocab_size = cfg.vocab_size
        self.context_len = args.context_length or getattr(cfg, "max_position_embeddings", 4096)
        self.num_layers = cfg.num_hidden_layers
        # This rank's KV heads (all of them with one rank; one replicated head when ranks outnumber them).
        self.num_kv_heads = self.model.model.layers[0].self_attn.num_kv_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

        self.kv_dtype = torch.float8_e4m3fn if args.kv_cache_dtype == "fp8_e4m3" else self.dtype
        size = args.max_total_tokens or self._size_from_memory()
        if tp is not None:
            size = tp.min_over_ranks(size)  # every rank's scheduler must make the same allocations
        self.token_to_kv_pool = TokenToKVPool(
            size, self.dtype, self.num_kv_heads, self.head_dim, self.num_layers, device=self.device, kv_dtype=self.kv_dtype
        )
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size, device=self.device)
        # One row per running request, +1 for a request in the middle of a chunked prefill.
        self.req_to_token_pool = ReqToTokenPool(args.max_running_requests + 1, self.context_len + 1, device=self.device)
        backend = args.attention_backend
        if self.token_to_kv_pool.quantized:
            # fp8 KV is read by torch_native, and by triton where Triton has e4m3 (not on CUDA before sm89).
            e4m3 = self.device.type != "cuda" or torch.cuda.get_device_capability(self.device) >= (8, 9)
            if backend not in ("auto", "torch_native", "triton") or (backend == "triton" and not e4m3):
                raise ValueError(f"kv_cache_dtype='fp8_e4m3' works with attention_backend 'torch_native' or 'triton' "
                                 f"(triton on CUDA needs compute capability 8.9+), or 'auto'; not {backend!r}")  # fmt: skip
            if backend == "auto" and not e4m3:
                backend = "torch_native"
        self.attn_backend = create_attention_backend(backend, self.device, self.kv_dtype, self.head_dim)
        self.attn_backend.bind_model(self.model.model.layers[0].self_attn.attn.layer, self.dtype, self.kv_dtype)
        self.max_total_tokens = size
        logger.info(
            "model %s loaded: %s on %s, KV pool %d tokens (%.1f MiB), context %d",
            args.model_path, self.dtype, self.device, size, self.token_to_kv_pool.mem_bytes() / 2**20, self.context_len,
        )
        self.cuda_graph_runner: CudaGraphRunner | None = None
        if self._use_cuda_graph():
            sizes = capture_batch_sizes(min(args.cuda_graph_max_bs or DEFAULT_MAX_BS, args.max_running_requests))
            try:
                self.cuda_graph_runner = CudaGraphRunner(self, sizes)
            except Exception as e:
                raise RuntimeError(
                    f"capturing the decode CUDA graphs failed ({e}); --disable-cuda-graph runs without them"
                ) from e

        self.cpu_decode: CpuDecodeRunner | None = None
        if self.device.type == "cpu":
            reason = unsupported(self)
            if reason is None:
                self.cpu_decode = CpuDecodeRunner(self)
            else:
                logger.info("decode steps run op by op in torch (no fused CPU decode step): %s", reason)

    def _use_cuda_graph(self) -> bool:
        """Graphs for decode steps: on CUDA, with a backend whose decode metadata can live in fixed tensors."""
        if self.args.disable_cuda_graph or self.device.type != "cuda":
            return False
        name = type(self.attn_backend).__name__
        if not self.attn_backend.supports_cuda_graph:
            logger.info("decode steps run without CUDA graphs: the %s attention backend cannot be captured", name)
            return False
        if self.token_to_kv_pool.quantized:
            # Its scales are calibrated, with a host sync, on a layer's first write: a capture's warm-up
            # run would take them from its padding rows.
            logger.info("decode steps run without CUDA graphs: the fp8 KV cache calibrates its scales on first write")
            return False
        return True

    def _size_from_memory(self) -> int:
        per_token = TokenToKVPool.bytes_per_token(self.kv_dtype, self.num_kv_heads, self.head_dim, self.num_layers)
        budget = int(available_memory_bytes(self.device) * self.args.mem_fraction_static)
        size = budget // per_token
        if self.device.type == "cpu":
            size = min(size, CPU_MAX_DEFAULT_TOKENS)
        return max(size, 16)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Run the model over the batch's new tokens -> hidden states [T, hidden] (after the final norm).

        The batch's tensors are moved to the model's device in place. Decode batches of up to
        `cuda_graph_max_bs` rows replay a captured CUDA graph when there is one; on the CPU, decode
        batches of up to `cpu_decode.MAX_ROWS` rows run in one C++ call where the model allows it."""
        fb.req_to_token_pool = self.req_to_token_pool
        fb.token_to_kv_pool = self.token_to_kv_pool
        fb.attn_backend = self.attn_backend
        for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens"):
            setattr(fb, name, to_device(getattr(fb, name), self.device))
        if self.cuda_graph_runner is not None and self.cuda_graph_runner.can_run(fb):
            return self.cuda_graph_runner.replay(fb)
        if self.cpu_decode is not None and self.cpu_decode.can_run(fb):
            return self.cpu_decode.replay(fb)
        self.attn_backend.init_forward_metadata(fb)
        return self.model(fb.input_ids, fb.positions, fb)

    @property
    def can_compute_sparse_logits(self) -> bool:
        """Whether `compute_logits_sparse` may be used: the CPU (where the LM head's arithmetic is
        what a decode step waits for) and the whole vocabulary on one rank."""
        head = getattr(self.model, "lm_head", None)
        return (self.device.type == "cpu" and hasattr(head, "logits_for_ids") and head.tp_size == 1
                and head.num_embeddings == self.vocab_size)  # fmt: skip

    @torch.inference_mode()
    def compute_logits_sparse(self, hidden: torch.Tensor, allowed: list[torch.Tensor | None]) -> torch.Tensor:
        """hidden: [B, hidden] -> logits [B, vocab] fp32 where row i with `allowed[i]` (token ids)
        gets logits for those tokens only and -inf elsewhere (a grammar allows nothing else
        there), and the rows with None go through the LM head together."""
        logits = torch.full((hidden.shape[0], self.vocab_size), float("-inf"), dtype=torch.float32, device=hidden.device)
        dense = [i for i, ids in enumerate(allowed) if ids is None]
        if dense:
            logits[dense] = self.compute_logits(hidden[dense])
        head = self.model.lm_head
        for i, ids in enumerate(allowed):
            if ids is not None:
                logits[i, ids] = head.logits_for_ids(hidden[i], ids)
        return logits

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, scratch: ScratchRows | None = None) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32; written into `scratch`'s block where
        it hands one out (the result is then valid until that scratch's next use)."""
        out = scratch.get(hidden.shape[0], self.vocab_size, hidden.device) if scratch is not None else None
        return self.model.compute_logits(hidden, out=out).float()
