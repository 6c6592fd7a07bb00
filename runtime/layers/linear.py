"""Tensor-parallel-ready linear layers (the Megatron / vLLM split).

Each layer holds only its rank's shard and owns a `weight_loader(param, loaded_weight, shard_id)`
that cuts that shard out of the full checkpoint tensor. `loaded_weight` is a `torch.Tensor` or a
safetensors slice (`safe_open(...).get_slice(name)`), so a rank reads only the bytes it keeps.

With `tp_size == 1` every layer is a plain `nn.Linear`. With `tp_size > 1`:
- column-parallel layers split the output features and return this rank's part;
- row-parallel layers split the input features and all-reduce their partial sums over the
  default `torch.distributed` process group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loom.kernels.cpu import BLOCK, quantize
from loom.runtime.layers.quantized import quantized_linear

# A full checkpoint tensor, or a lazy safetensors slice of one (supports `[...]` and `get_shape()`).
LoadedWeight = Any


def loaded_shape(loaded: LoadedWeight) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def read_shard(loaded: LoadedWeight, dim: int = 0, start: int = 0, size: int | None = None) -> torch.Tensor:
    """`loaded.narrow(dim, start, size)` as a tensor; reads only that range from a safetensors slice."""
    full = loaded_shape(loaded)
    size = full[dim] - start if size is None else size
    if start + size > full[dim]:
        raise ValueError(f"shard [{start}, {start + size}) along dim {dim} exceeds the checkpoint shape {full}")
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = tuple(slice(start, start + size) if d == dim else slice(None) for d in range(len(full)))
    return loaded[index]


def copy_checked(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, the model expects {tuple(dst.shape)}")
    dst.copy_(src)


# Up to this many rows, an fp32 matmul on the CPU goes through `skinny_linear`.
SKINNY_ROWS = 32


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for few rows (decode) on the CPU in fp32, 2-4x faster than the plain call where measured.

    MKL's sgemv / skinny sgemm streamed weights at ~10 GB/s on an AMD EPYC (memory reads run at
    ~35 GB/s), while `bmm` over the weight cut into row blocks reaches ~35 GB/s, even on one thread.
    Each output is still one dot product, so the result equals `F.linear` up to summation order.
    x: [M, in], weight: [out, in] -> [M, out]
    """
    m = x.shape[0]
    out_features, in_features = weight.shape
    if x.device.type != "cpu" or x.dtype != torch.float32 or m > SKINNY_ROWS or x.dim() != 2 or not weight.is_contiguous():
        return F.linear(x, weight, bias)
    blocks = max(torch.get_num_threads(), 2)
    if out_features % blocks:
        blocks = 2
        if out_features % blocks:
            return F.linear(x, weight, bias)
    w = weight.view(blocks, out_features // blocks, in_features)
    xt = x.t().unsqueeze(0).expand(blocks, in_features, m)
    if bias is None:
        out = torch.bmm(w, xt)
    else:
        out = torch.baddbmm(bias.view(blocks, -1, 1), w, xt)
    out = out.view(out_features, m).t()  # [M, out]
    return out if m == 1 else out.contiguous()


# From this many rows, a CPU fp32 matmul whose weight was packed (`pack_cpu_weights`) uses oneDNN.
PACKED_MIN_ROWS = 5


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias: through oneDNN with the weight in its blocked layout (`packed`) from
    PACKED_MIN_ROWS rows, else `skinny_linear`. benchmarks/bench_linear.py on 2 cores of an AMD
    EPYC, the body of a 135M model (30 layers' linears, weights not in cache): 16 rows 62 -> 47 ms,
    40 rows 106 -> 77 ms, 1024 rows 1.72 -> 1.41 s; the LM head (49k x 576) at 16 rows 17 -> 9 ms.
    Below 5 rows the blocked path is slower (1 row: 16 -> 24 ms) and the plain weight is used."""
    if packed is not None and x.dim() == 2 and x.shape[0] >= PACKED_MIN_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return skinny_linear(x, weight, bias)


def pack_cpu_weights(model: nn.Module) -> int:
    """Give every fp32 CPU linear weight of `model` (the modules with a `packed_weight` slot: the
    linear layers and the LM head) a oneDNN-blocked copy, used by `linear` from PACKED_MIN_ROWS
    rows. The plain weight stays (fewer rows, sparse logits, tensor-parallel loading), so this
    costs the weights' memory again. -> bytes added; 0 where oneDNN is not available."""
    if not torch.backends.mkldnn.is_available():
        return 0
    added = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "packed_weight") or weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            continue
        if getattr(module, "qweight", None) is not None:  # computed from its blocks (a quantized LM head)
            continue
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16)
        added += weight.numel() * weight.element_size()
    return added


def default_weight_loader(param: torch.Tensor, loaded: LoadedWeight, shard_id: Any = None) -> None:
    """Replicated parameters (norms, unsharded biases): copy the whole tensor."""
    assert shard_id is None, f"a replicated parameter has no shards, got shard_id={shard_id!r}"
    copy_checked(param.data, read_shard(loaded), "replicated weight")


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel ranks (the default process group), in place."""
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("tp_size > 1 needs torch.distributed to be initialised before the forward pass")
    dist.all_reduce(x)
    return x


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tp_size={denominator}")
    return numerator // denominator


class LinearBase(nn.Module):
    """weight: [out_per_rank, in_per_rank]; the parameters carry `weight_loader` for the model loader."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        assert 0 <= tp_rank < tp_size, f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})"
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # oneDNN's layout of `weight` (pack_cpu_weights)
        # Kept quantized (layers/quantized.py): the weight's blocks and their format; `weight` is then None.
        self.register_buffer("qweight", None, persistent=False)
        self.qtype: str | None = None
        self.qpanels = False  # qweight laid out in panels of 16 output rows (layers/quantized.py pack_panels)
        # The input features in the blocks' order, where it is not theirs (a GPTQ act-order checkpoint).
        self.register_buffer("input_perm", None, persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        raise NotImplementedError

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.qweight is not None:
            if self.input_perm is not None:
                x = x.index_select(-1, self.input_perm)
            return quantized_linear(x, self.qweight, self.qtype, bias, self.qpanels)
        return linear(x, self.weight, bias, self.packed_weight)

    def quantize_(self, qtype: str) -> int:
        """Keep this layer's weight as `qtype` blocks (layers/quantized.py) instead of floats.
        -> the float bytes freed (0 when its input features are not whole blocks: it stays float)."""
        weight = self.weight.detach()
        if weight.shape[1] % BLOCK:
            return 0
        self.qweight, self.qtype, self.qpanels = quantize(weight, qtype).to(weight.device), qtype, False
        del self.weight
        self.register_parameter("weight", None)
        self.packed_weight = None
        return weight.numel() * weight.element_size()

    def load_quantized_(self, qweight: torch.Tensor, qtype: str, input_perm: torch.Tensor | None = None) -> int:
        """Keep blocks made from a quantized checkpoint (models/gptq_awq.py) instead of the float weight;
        `input_perm` [in_per_rank] int64: the input feature each block column reads. -> the float bytes freed."""
        device, freed = self.weight.device, self.weight.numel() * self.weight.element_size()
        self.qweight, self.qtype, self.qpanels = qweight.to(device), qtype, False
        self.input_perm = None if input_perm is None else input_perm.to(device)
        del self.weight
        self.register_parameter("weight", None)
        self.packed_weight = None
        return freed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_per_rank] -> [T, out_per_rank]
        return self.matmul(x, self.bias)


class ReplicatedLinear(LinearBase):
    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        super().__init__(in_features, out_features, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        default_weight_loader(param, loaded, shard_id)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: rank r holds rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.out_per_rank = divide(out_features, tp_size, "output features")
        super().__init__(in_features, self.out_per_rank, bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        assert shard_id is None, f"{type(self).__name__} has no packed shards, got shard_id={shard_id!r}"
        size = param.shape[0]
        copy_checked(param.data, read_shard(loaded, 0, self.tp_rank * size, size), type(self).__name__)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears packed along the output (gate_up_proj = [gate; up]).

    On each rank the packed weight is [gate_shard; up_shard]; `shard_id` is the index into `output_sizes`.
    """

    def __init__(
        self, in_features: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0, tp_size: int = 1
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: int | None = None) -> None:
        assert isinstance(shard_id, int), f"gate_up weights load one shard at a time, got shard_id={shard_id!r}"
        size = divide(self.output_sizes[shard_id], self.tp_size, "packed output features")
        offset = sum(divide(s, self.tp_size, "packed output features") for s in self.output_sizes[:shard_id])
        dst = param.data.narrow(0, offset, size)
        copy_checked(dst, read_shard(loaded, 0, self.tp_rank * size, size), f"packed shard {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections packed along the output: [q heads; k heads; v heads] of this rank.

    When there are fewer KV heads than ranks, each KV head is replicated on tp_size / kv_heads ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = divide(total_num_heads, tp_size, "num_attention_heads")
        if tp_size >= total_num_kv_heads:
            divide(tp_size, total_num_kv_heads, "tp_size over num_key_value_heads")
            self.num_kv_heads, self.kv_replicas = 1, tp_size // total_num_kv_heads
        else:
            self.num_kv_heads, self.kv_replicas = divide(total_num_kv_heads, tp_size, "num_key_value_heads"), 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias, tp_rank, tp_size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: str | None = None) -> None:
        if shard_id == "q":
            offset, size, rank = 0, self.q_size, self.tp_rank
        elif shard_id == "k":
            offset, size, rank = self.q_size, self.kv_size, self.tp_rank // self.kv_replicas
        elif shard_id == "v":
            offset, size, rank = self.q_size + self.kv_size, self.kv_size, self.tp_rank // self.kv_replicas
        else:
            raise AssertionError(f"qkv weights load one of 'q', 'k', 'v' at a time, got shard_id={shard_id!r}")
        dst = param.data.narrow(0, offset, size)
        copy_checked(dst, read_shard(loaded, 0, rank * size, size), f"{shard_id}_proj")


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the partial outputs are summed (all-reduce) when tp_size > 1.

    The bias is added by rank 0 only, so the reduced sum holds it once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        tp_rank: int = 0,
        tp_size: int = 1,
        reduce_results: bool = True,
    ) -> None:
        super().__init__(divide(in_features, tp_size, "input features"), out_features, bias, tp_rank, tp_size)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
        assert shard_id is None, f"{type(self).__name__} has no packed shards, got shard_id={shard_id!r}"
        if param.ndim == 1:  # the bias is not split
            copy_checked(param.data, read_shard(loaded), "row-parallel bias")
            return
        size = param.shape[1]
        copy_checked(param.data, read_shard(loaded, 1, self.tp_rank * size, size), type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, in_per_rank] -> [T, out]
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        # Only one rank adds the bias to its partial sum, so the reduced sum holds it once.
        out = self.matmul(x, self.bias if self.tp_rank == 0 else None)
        return tensor_parallel_all_reduce(out) if self.reduce_results else out
