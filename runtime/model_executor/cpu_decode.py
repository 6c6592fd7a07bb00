"""Decode steps on the CPU in one C++ call: the CPU's analogue of the CUDA graph runner.

At one row, a decode step of a small quantized model is mostly dispatch: SmolLM2-135M's Q4_1 body
reads ~66 MB of weights in ~4 ms on two cores, while the torch path ran ~50 small ops a layer at a few
microseconds each (~7 ms more per step). `CpuDecodeRunner` hands the model's layers to the C++
`DecodeModel` (kernels/cpu/decode.cpp) once, as the graph runner captures a CUDA graph once; a
decode step is then the embedding lookup and one call, which runs every layer and the final norm
(RMSNorm with the residual add, q/k/v, rotary, KV store, attention, o_proj, gate/up, SiLU * up,
down) with no allocation per op. The LM head and sampling stay where they are.

It takes the decode steps of up to MAX_ROWS rows of a model it can run whole (`unsupported`): a
Llama / Mistral-shaped model (no q/k norm, no biases) whose every projection is kept quantized in a
block format the CPU kernel reads, in fp32 or bf16, with a KV cache in the model's dtype, on one
rank, with the torch_native attention backend. Anything else (prefill, larger batches, other models,
a CPU where the extension cannot be built) runs the torch path, which stays the reference: both give
the same greedy tokens (tests/runtime/test_cpu_decode.py). LOOM_CPU_FUSED_DECODE=0 turns it off.
Its linear layers quantize x to int8 blocks (LOOM_CPU_INT8_ACT=0: they don't), as the torch path's
qlinear does (kernels/cpu: ~1.7x faster a step at one row, ~1e-2 relative error a layer).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from loom.kernels.cpu import PANELS, QTYPES, extension, int8_activations
from loom.runtime.layers.quantized import KERNEL_MAX_ROWS
from loom.runtime.model_executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from loom.runtime.model_executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)

ENV = "LOOM_CPU_FUSED_DECODE"  # "0": decode steps take the torch path
MAX_ROWS = KERNEL_MAX_ROWS  # the quantized kernel's rows; larger batches are bound by weights, not dispatch
_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def unsupported(runner: ModelRunner) -> str | None:
    """Why the fused decode step cannot run `runner`'s model, or None when it can."""
    from loom.runtime.models.llama import LlamaForCausalLM

    model = runner.model
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if runner.device.type != "cpu" or runner.tp_size != 1:
        return "not a single-rank CPU model"
    if not isinstance(model, LlamaForCausalLM) or model.model.layers[0].self_attn.q_norm is not None:
        return f"{type(model).__name__} is not a Llama-shaped model without q/k norm"
    if runner.dtype not in (torch.float32, torch.bfloat16) or runner.kv_dtype != runner.dtype:
        return f"dtype {runner.dtype} with KV cache dtype {runner.kv_dtype} (fp32 or bf16, the KV cache alike)"
    if type(runner.attn_backend).__name__ != "TorchNativeAttnBackend":
        return f"attention backend {type(runner.attn_backend).__name__}"
    for i, layer in enumerate(model.model.layers):
        for name in _PROJECTIONS:
            proj = layer.get_submodule(name)
            if proj.qtype not in QTYPES or proj.bias is not None or proj.input_perm is not None:
                return f"layer {i} {name} is not a bias-free layer kept in {'/'.join(QTYPES)} blocks"
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.rotary_emb)
        if any(n.fused_ops == "triton" for n in norms):
            return "fused_ops='triton' was asked for"
    if extension() is None:
        return "the CPU kernels could not be built"
    return None


class CpuDecodeRunner:
    """Runs decode steps of up to MAX_ROWS rows through `DecodeModel`; `can_run` says which."""

    def __init__(self, runner: ModelRunner) -> None:
        inner = runner.model.model
        self.embed_tokens = inner.embed_tokens
        self.req_to_token = runner.req_to_token_pool.req_to_token  # [rows, context] int64, updated in place
        self.decoder = self._capture(runner)

    @staticmethod
    def _capture(runner: ModelRunner) -> Any:
        """A `DecodeModel` holding the layers' weights and this runner's KV buffers (no copies)."""
        inner = runner.model.model
        attn, mlp = inner.layers[0].self_attn, inner.layers[0].mlp
        pool = runner.token_to_kv_pool
        decoder = extension().DecodeModel(
            inner.norm.weight.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim, mlp.gate_up_proj.qweight.shape[0] // 2,
            float(inner.norm.eps), float(attn.attn.layer.scaling), runner.dtype == torch.bfloat16,
            _fp32(inner.norm.weight), _fp32(attn.rotary_emb.cos_sin_cache), int8_activations(),
        )  # fmt: skip
        for i, layer in enumerate(inner.layers):
            qkv, o = layer.self_attn.qkv_proj, layer.self_attn.o_proj
            gate_up, down = layer.mlp.gate_up_proj, layer.mlp.down_proj
            decoder.add_layer(
                _fp32(layer.input_layernorm.weight), qkv.qweight, _code(qkv), o.qweight, _code(o),
                _fp32(layer.post_attention_layernorm.weight), gate_up.qweight, _code(gate_up),
                down.qweight, _code(down), pool.k_buffer[i], pool.v_buffer[i],
            )  # fmt: skip
        return decoder

    def can_run(self, fb: ForwardBatch) -> bool:
        return fb.is_decode and fb.batch_size <= MAX_ROWS

    def replay(self, fb: ForwardBatch) -> torch.Tensor:
        """The decode batch's hidden states after the final norm [B, hidden]; this step's K and V stored."""
        hidden = self.embed_tokens(fb.input_ids)  # [B, hidden]
        return self.decoder.forward(hidden, _i64(fb.positions), _i64(fb.out_cache_loc), self.req_to_token,
                                    _i64(fb.req_pool_indices), _i64(fb.seq_lens))  # fmt: skip


def _code(proj: Any) -> int:
    """The kernel's code for a layer's blocks: GGUF's type id, with PANELS where they are laid out in panels."""
    return QTYPES[proj.qtype] | (PANELS if proj.qpanels else 0)


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _i64(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64).contiguous()
