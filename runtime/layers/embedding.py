"""Vocabulary-parallel token embedding and LM head.

The vocabulary is padded to a multiple of tp_size and split into contiguous ranges, one per rank.
Rows past the real vocabulary are zero and their logits are cut off again in `compute_logits`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.cpu import BLOCK, dequantize, quantize
from loom.runtime.layers.linear import (
    LoadedWeight,
    copy_checked,
    linear,
    loaded_shape,
    read_shard,
    tensor_parallel_all_reduce,
)
from loom.runtime.layers.quantized import KERNEL_MAX_ROWS, kernel_rows, quantized_linear


def tensor_parallel_all_gather(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """x: [N, V / tp] on each rank -> [N, V], ranks in order along the last dim."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("tp_size > 1 needs torch.distributed to be initialised before the forward pass")
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


class VocabParallelEmbedding(nn.Module):
    """weight: [V_padded / tp, hidden]; rank r holds token ids [r * V_padded / tp, (r + 1) * V_padded / tp)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        assert 0 <= tp_rank < tp_size, f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})"
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.tp_rank, self.tp_size = tp_rank, tp_size
        padded = -(-num_embeddings // tp_size) * tp_size
        self.per_rank = padded // tp_size
        self.vocab_start = tp_rank * self.per_rank
        self.vocab_end = min(self.vocab_start + self.per_rank, num_embeddings)  # real rows held here: [start, end)
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: None = None) -> None:
        assert shard_id is None, f"embeddings have no packed shards, got shard_id={shard_id!r}"
        rows, cols = loaded_shape(loaded)
        if (rows, cols) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"embedding weight has shape {(rows, cols)}, the config says {(self.num_embeddings, self.embedding_dim)}"
            )
        real = max(self.vocab_end - self.vocab_start, 0)
        if real:
            copy_checked(param.data[:real], read_shard(loaded, 0, self.vocab_start, real), "embedding")
        param.data[real:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # input_ids: [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill_(outside.unsqueeze(-1), 0)
        return tensor_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows [{self.vocab_start}, {self.vocab_end}) on this rank"


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, split over the vocabulary like the embedding (and tied to it when asked)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__(num_embeddings, embedding_dim, tp_rank, tp_size)
        self.packed_weight: torch.Tensor | None = None  # oneDNN's layout of `weight` (pack_cpu_weights)
        # The head kept quantized (layers/quantized.py): blocks of `weight`, which stays only for the
        # embedding it is tied to (an untied head drops it); the logits then come from the blocks.
        self.register_buffer("qweight", None, persistent=False)
        self.qtype: str | None = None

    def quantize_(self, qtype: str, keep_float: bool = True) -> bool:
        """Compute the logits from `qtype` blocks of the weight; False when its rows are not whole blocks.
        keep_float=False (an untied head: nothing else reads the weight) frees the float weight."""
        if self.weight.shape[1] % BLOCK:
            return False
        self.qweight, self.qtype, self.packed_weight = quantize(self.weight.detach(), qtype).to(self.weight.device), qtype, None
        if not keep_float:
            del self.weight
            self.register_parameter("weight", None)
        return True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("ParallelLMHead is applied through compute_logits(hidden_states)")

    def logits_for_ids(self, hidden_state: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden_state: [hidden], ids: [k] int64 -> those tokens' logits [k] fp32 (one rank only)."""
        assert self.tp_size == 1, "logits_for_ids needs the whole vocabulary on one rank"
        if self.qweight is not None:
            rows = dequantize(self.qweight.index_select(0, ids), self.qtype, self.embedding_dim)
            return torch.mv(rows, hidden_state.float())
        return torch.mv(self.weight.index_select(0, ids), hidden_state).float()

    def compute_logits(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [N, hidden] -> logits [N, vocab] in fp32 (matmul in the model dtype).
        `out` ([N, vocab] fp32) receives them where it can (one rank, fp32, no vocabulary padding):
        the same GEMM as `F.linear`, written into a kept block instead of a fresh one. A quantized
        head, up to the kernel's rows (decode), computes in fp32 whatever the model dtype, and its
        logits stay fp32 (in a bf16 model, not rounded to bf16 and back), as `logits_for_ids` gives
        them on the grammar path. Past those rows it would be dequantised whole every call (a 49k-row
        head at 32 rows: 50 ms of a 130 ms decode step), so a head tied to the embedding multiplies
        the embedding's own float weight there, and an untied one dequantises bands in the model dtype."""
        rows = hidden_states.shape[0]
        if self.qweight is not None and rows <= KERNEL_MAX_ROWS:
            logits = quantized_linear(hidden_states.float(), self.qweight, self.qtype)
        elif self.qweight is not None and self.weight is None:  # fp32 where the kernel takes it (no bf16 rounding)
            logits = quantized_linear(hidden_states.float() if rows <= kernel_rows() else hidden_states, self.qweight, self.qtype)
        elif (out is not None and self.tp_size == 1 and out.shape == (hidden_states.shape[0], self.num_embeddings)
                and self.weight.shape[0] == self.num_embeddings
                and self.weight.dtype == hidden_states.dtype == out.dtype == torch.float32):  # fmt: skip
            return torch.matmul(hidden_states, self.weight.t(), out=out)
        else:
            logits = linear(hidden_states, self.weight, packed=self.packed_weight)  # [N, V_padded / tp]
        if self.tp_size > 1:
            logits = tensor_parallel_all_gather(logits, self.tp_size)
        if logits.shape[-1] != self.num_embeddings:
            logits = logits[:, : self.num_embeddings]
        return logits.float()
