"""Registry of native model classes, keyed by the Hugging Face `architectures` name."""

from __future__ import annotations

from typing import Any

from torch import nn

from loom.runtime.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def get_model_class(config: Any) -> type[nn.Module]:
    """The class for `config.architectures`; ValueError naming the supported ones otherwise."""
    architectures = list(getattr(config, "architectures", None) or [])
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported model architecture {architectures or '(config.json names none)'}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )


__all__ = ["MODEL_REGISTRY", "get_model_class"]
