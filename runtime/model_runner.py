"""Loads the model, owns the KV pools and the attention backend, runs one forward pass."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig

from loom.kernels.attention import create_attention_backend
from loom.radix_cache import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator
from loom.runtime.forward_batch import ForwardBatch
from loom.runtime.models.loader import load_model
from loom.runtime.server_args import ServerArgs

if TYPE_CHECKING:
    from loom.runtime.distributed import TpGroup

logger = logging.getLogger(__name__)

# Without a --max-total-tokens the pool is sized from memory, up to this many slots on CPU.
CPU_MAX_DEFAULT_TOKENS = 1 << 18

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str, gpu_id: int = 0) -> torch.device:
    """"auto" -> cuda when available, else cpu; a bare "cuda" -> GPU `gpu_id` (data-parallel
    replicas and tensor-parallel ranks each take their own)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", gpu_id)
    return resolved


def resolve_dtype(dtype: str, device: torch.device, config) -> torch.dtype:
    if dtype != "auto":
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32  # CPU matmuls in bf16 are slower and less exact; fp32 is the CPU default
    checkpoint = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = _DTYPES.get(checkpoint)
    return checkpoint if checkpoint in (torch.bfloat16, torch.float16) else torch.bfloat16


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
        config = AutoConfig.from_pretrained(args.model_path)
        self.dtype = resolve_dtype(args.dtype, self.device, config)
        self.model, self.hf_config = load_model(
            args.model_path, self.dtype, device=self.device, tp_rank=self.tp_rank, tp_size=self.tp_size
        )
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
        if self.token_to_kv_pool.quantized and backend not in ("auto", "torch_native"):
            raise ValueError(f"kv_cache_dtype='fp8_e4m3' works with attention_backend 'torch_native' (or 'auto') so far, "
                             f"not {backend!r}")  # fmt: skip
        if self.token_to_kv_pool.quantized:
            backend = "torch_native"  # the only backend that reads an fp8 KV cache so far
        self.attn_backend = create_attention_backend(backend, self.device)
        self.max_total_tokens = size
        logger.info(
            "model %s loaded: %s on %s, KV pool %d tokens (%.1f MiB), context %d",
            args.model_path, self.dtype, self.device, size, self.token_to_kv_pool.mem_bytes() / 2**20, self.context_len,
        )

    def _size_from_memory(self) -> int:
        per_token = TokenToKVPool.bytes_per_token(self.kv_dtype, self.num_kv_heads, self.head_dim, self.num_layers)
        budget = int(available_memory_bytes(self.device) * self.args.mem_fraction_static)
        size = budget // per_token
        if self.device.type == "cpu":
            size = min(size, CPU_MAX_DEFAULT_TOKENS)
        return max(size, 16)

    @torch.inference_mode()
    def forward(self, fb: ForwardBatch) -> torch.Tensor:
        """Run the model over the batch's new tokens -> hidden states [T, hidden] (after the final norm)."""
        fb.req_to_token_pool = self.req_to_token_pool
        fb.token_to_kv_pool = self.token_to_kv_pool
        fb.attn_backend = self.attn_backend
        self.attn_backend.init_forward_metadata(fb)
        return self.model(fb.input_ids.to(self.device), fb.positions.to(self.device), fb)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden] -> logits [N, vocab] in fp32."""
        return self.model.compute_logits(hidden).float()
