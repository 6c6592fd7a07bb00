"""Llama-family decoders: Llama 2/3, Qwen2/2.5, Qwen3 and Mistral, one module family.

The architectures differ only by flags read from the config and the class:
- Llama / Mistral: q/k/v/o bias iff `attention_bias`; gate/up/down bias iff `mlp_bias`.
- Qwen2: q/k/v always carry a bias, o_proj never.
- Qwen3: RMSNorm over each head of q and k (`q_norm`, `k_norm`) before the rotary embedding.

`forward(input_ids, positions, forward_batch)` returns the final-norm hidden states of every new
token; the caller picks the rows it needs and calls `compute_logits` on those only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from loom.runtime.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RadixAttention,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    get_rope,
)
from loom.runtime.model_executor.forward_batch import ForwardBatch


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def num_kv_heads_of(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def check_full_attention(config: Any) -> None:
    """Raise NotImplementedError for a sliding window that would ever cut the context short."""
    window = getattr(config, "sliding_window", None)
    active = window is not None and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None)
    if active and layer_types is not None:
        active = "sliding_attention" in layer_types
    max_position = getattr(config, "max_position_embeddings", None)
    if active and (max_position is None or window < max_position):
        raise NotImplementedError(
            f"sliding-window attention (sliding_window={window} < max_position_embeddings={max_position}) is not "
            "supported yet; only models whose window covers the whole context can be served"
        )


class LlamaMLP(nn.Module):
    def __init__(self, config: Any, tp_rank: int, tp_size: int) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        if config.hidden_act != "silu":
            raise NotImplementedError(f"hidden_act={config.hidden_act!r} is not supported; expected 'silu'")
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size], bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias, tp_rank, tp_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden] -> [T, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(
        self,
        config: Any,
        layer_id: int,
        rotary_emb: RotaryEmbedding,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        tp_rank: int,
        tp_size: int,
    ) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads_of(config), qkv_bias, tp_rank, tp_size
        )
        self.num_heads, self.num_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size, o_bias, tp_rank, tp_size)
        eps = config.rms_norm_eps
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.rotary_emb = rotary_emb  # one module shared by all layers (its table is a non-persistent buffer)
        self.attn = RadixAttention(layer_id, self.num_heads, self.num_kv_heads, head_dim, head_dim**-0.5)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        # positions: [T], hidden: [T, hidden] -> [T, hidden]
        qkv = self.qkv_proj(hidden)  # [T, (H + 2 Hkv) D]
        t, h, hkv, d = qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size :].view(t, hkv, d)
        if self.q_norm is None:
            # q and k heads sit side by side in qkv: rotate them in one pass, in place.
            qk = self.rotary_emb.forward_packed(positions, qkv[:, : self.q_size + self.kv_size].view(t, h + hkv, d))
            q, k = qk[:, :h], qk[:, h:]
        else:
            q = self.q_norm(qkv[:, : self.q_size].view(t, h, d))
            k = self.k_norm(qkv[:, self.q_size : self.q_size + self.kv_size].view(t, hkv, d))
            q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: Any, layer_id: int, rotary_emb: RotaryEmbedding, flags: dict[str, bool], tp_rank: int, tp_size: int
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary_emb, tp_rank=tp_rank, tp_size=tp_size, **flags)
        self.mlp = LlamaMLP(config, tp_rank, tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual: [T, hidden] -> (mlp output, residual stream before it); the add is fused into the next norm."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, flags: dict[str, bool], tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        rotary_emb = get_rope(config, head_dim_of(config))
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, rotary_emb, flags, tp_rank, tp_size) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden states [T, hidden] after the final norm
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Checkpoint projection name -> (packed parameter, shard id), as vLLM / nano-vllm pack them.
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    # None: read `attention_bias` from the config.
    qkv_bias: ClassVar[bool | None] = None
    o_bias: ClassVar[bool | None] = None
    qk_norm: ClassVar[bool] = False

    def __init__(self, config: Any, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        check_full_attention(config)
        attention_bias = bool(getattr(config, "attention_bias", False))
        flags = {
            "qkv_bias": attention_bias if self.qkv_bias is None else self.qkv_bias,
            "o_bias": attention_bias if self.o_bias is None else self.o_bias,
            "qk_norm": self.qk_norm,
        }
        self.config = config
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.model = LlamaModel(config, flags, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T] (the batch's new tokens) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden_states: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states: [N, hidden] (only the rows that need logits) -> [N, vocab] fp32, into
        `out` where the head can write there."""
        return self.lm_head.compute_logits(hidden_states, out=out)


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True
    o_bias = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
