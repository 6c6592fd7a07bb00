"""Build a native model from a Hugging Face folder or a GGUF file and stream its weights into it.

The model is built directly on the target device in the target dtype (parameters are
`torch.empty`, so nothing is initialised twice); each checkpoint tensor is then read once, as a
lazy slice (safetensors', or a `GGUFWeight` that dequantises what it reads) that the parameter's
`weight_loader` cuts to this rank's shard.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from loom.runtime.layers.embedding import ParallelLMHead
from loom.runtime.layers.linear import LinearBase, LoadedWeight, default_weight_loader
from loom.runtime.layers.quantized import QUANTIZATION_MODES, layer_type, packed_source, runs_on
from loom.runtime.models import get_model_class
from loom.runtime.models.gguf_file import find_gguf_file, read_gguf
from loom.runtime.models.gguf_loader import gguf_config, iter_gguf_weights
from loom.runtime.models.gptq_awq import (
    QuantizedAssembler,
    check_quantization_mode,
    iter_quantized_checkpoint,
    keeps_quantized,
    read_quant_scheme,
)

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Buffers some checkpoints carry that the native model recomputes.
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype the checkpoint was saved in (`dtype` in Transformers 5, `torch_dtype` before), if stated."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = _DTYPE_NAMES.get(value.removeprefix("torch."))
    return value if isinstance(value, torch.dtype) else None


def resolve_model_dir(model_path: str | os.PathLike) -> pathlib.Path:
    """A local folder as is; otherwise a hub id already in the local Hugging Face cache (no download).
    (A GGUF file, or a folder holding one, is found by `gguf_file.find_gguf_file` first.)"""
    path = pathlib.Path(model_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"model path {str(path)!r} is a file; expected a folder with config.json or a .gguf file")
    try:
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(str(model_path), local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - any failure means "not available locally"
        raise FileNotFoundError(
            f"model path {str(model_path)!r} is neither a local folder nor a model in the local Hugging Face cache"
        ) from exc


def weight_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of the checkpoint: those named by the index, or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names weight files that are not in {model_dir}: {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {others}; convert them to safetensors)" if others else ""
        raise FileNotFoundError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def iter_checkpoint(files: list[pathlib.Path]) -> Iterator[tuple[str, LoadedWeight]]:
    """(name, lazy slice) for every tensor, file by file; a slice reads bytes only when indexed."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_slice(name)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, LoadedWeight]], source: str = "checkpoint") -> None:
    """Copy checkpoint tensors (Hugging Face names) into `model`; ValueError naming any that are missing.

    q/k/v and gate/up projections go to their packed parameter through `model.packed_modules_mapping`.
    """
    params = dict(model.named_parameters())  # a tied lm_head is listed once, as the embedding
    packed: dict[str, tuple[str, Any]] = getattr(model, "packed_modules_mapping", {})
    tied = getattr(model, "tie_word_embeddings", False)
    seen: set[str] = set()
    unexpected: list[str] = []
    for name, loaded in weights:
        if name.endswith(_SKIPPED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        target, shard_id = name, None
        for proj, (packed_name, shard) in packed.items():
            if f".{proj}." in name:
                target, shard_id = name.replace(f".{proj}.", f".{packed_name}."), shard
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, loaded, shard_id)
        except ValueError as exc:
            raise ValueError(f"{source}: cannot load {name!r}: {exc}") from exc
        seen.add(name)
    if unexpected:
        logger.warning("%s: ignored %d weights the model has no place for: %s", source, len(unexpected), unexpected[:8])
    expected: set[str] = set()
    for pname in params:
        sources = [pname.replace(f".{p}.", f".{proj}.") for proj, (p, _) in packed.items() if f".{p}." in pname]
        expected.update(sources or [pname])
    missing = sorted(expected - seen)
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"{source} is missing weights the model needs: {shown}")


def load_config(model_path: str | os.PathLike) -> Any:
    """The model's Transformers config: from config.json, or from a GGUF file's metadata.

    Raises:
        GGUFError (a ValueError): a GGUF file Loom cannot read.
        FileNotFoundError / OSError: no such model.
    """
    gguf_path = find_gguf_file(model_path)
    if gguf_path is not None:
        return gguf_config(read_gguf(gguf_path))
    return AutoConfig.from_pretrained(resolve_model_dir(model_path))


def load_model(
    model_path: str | os.PathLike,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    tp_rank: int = 0,
    tp_size: int = 1,
    quantization: str = "none",
) -> tuple[nn.Module, Any]:
    """-> (model in eval mode on `device` with `dtype` parameters, the Transformers config).

    `dtype` is explicit: the caller resolves "auto" (see `checkpoint_dtype`).

    `model_path`: a Hugging Face folder (safetensors, float or GPTQ / AWQ 4-bit), a GGUF file, or a
    folder holding one GGUF file.
    `quantization`: which linear layers stay quantized, on the CPU or CUDA (`layers/quantized.py`).

    Raises:
        FileNotFoundError: no such folder, no safetensors weights, or a shard named by the index is absent.
        ValueError: an unsupported architecture, or weights missing / shaped unlike the config says;
            GGUFError (a ValueError) for a GGUF file Loom cannot read, QuantizedCheckpointError (a
            ValueError) for a GPTQ / AWQ checkpoint Loom cannot run or int8 / int4 asked of one.
        NotImplementedError: a feature of the config not supported yet (sliding window, rope type).
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (resolve 'auto' first), got {dtype!r}")
    gguf_path = find_gguf_file(model_path)
    gguf_file = read_gguf(gguf_path) if gguf_path is not None else None
    scheme = None  # a GPTQ / AWQ checkpoint's quantization
    if gguf_file is not None:
        config = gguf_config(gguf_file)
    else:
        model_dir = resolve_model_dir(model_path)
        scheme = read_quant_scheme(model_dir)
        if scheme is not None:
            check_quantization_mode(scheme, quantization)
        config = AutoConfig.from_pretrained(model_dir)
    model_class = get_model_class(config)
    if gguf_file is not None:
        weights, source = iter_gguf_weights(gguf_file), f"GGUF file {gguf_path}"
    elif scheme is not None:
        weights, source = iter_quantized_checkpoint(weight_files(model_dir), scheme), f"{scheme.method.upper()} checkpoint {model_dir}"
    else:
        weights, source = iter_checkpoint(weight_files(model_dir)), f"checkpoint {model_dir}"
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config, tp_rank=tp_rank, tp_size=tp_size)
    # GPTQ / AWQ layers kept quantized as they load (models/gptq_awq.py); elsewhere they load dequantised.
    assembler = QuantizedAssembler(model) if keeps_quantized(scheme, quantization, torch.device(device)) else None
    source_types: dict[str, str] = {}
    load_weights(model, _recording_types(weights, source_types), source=source)
    kept = assembler.finish() if assembler is not None else None
    summary = quantize_layers(model, quantization, source_types, torch.device(device))
    if kept is not None:
        summary["layers"].update({f"{qtype} ({scheme.method.upper()})": n for qtype, n in kept["layers"].items()})
        summary["float_bytes"] += kept["float_bytes"]
        summary["quantized_bytes"] += kept["quantized_bytes"]
    if summary["layers"]:
        logger.info("linear layers kept quantized: %s; their weights %.1f MiB (%.1f MiB in %s)",
                    ", ".join(f"{n} {t}" for t, n in sorted(summary["layers"].items())), summary["quantized_bytes"] / 2**20,
                    summary["float_bytes"] / 2**20, dtype)  # fmt: skip
    return model.eval(), config


def quantize_layers(model: nn.Module, mode: str, source_types: dict[str, str], device: torch.device) -> dict[str, Any]:
    """Keep the linear layers that `mode` quantizes as blocks (`layers/quantized.py`).

    `source_types`: checkpoint tensor name -> its GGUF type (from the loader). -> a summary for the
    log: layers kept quantized by type, and their weight bytes before and after."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    summary: dict[str, Any] = {"layers": {}, "float_bytes": 0, "quantized_bytes": 0}
    if mode == "none":
        return summary
    if not runs_on(device):
        if mode in ("int8", "int4"):
            raise ValueError(f"quantization={mode!r} runs on the CPU, or on CUDA with triton installed; use 'none' on {device.type}")
        return summary  # auto where no kernel runs: dequantised
    for name, module in model.named_modules():
        if not isinstance(module, LinearBase) or module.weight is None:
            continue
        sources = {t for tensor, t in source_types.items() if tensor.startswith(name + ".") or packed_source(tensor, name)}
        qtype = layer_type(mode, sources)
        if qtype is None:
            continue
        freed = module.quantize_(qtype)
        if not freed:
            logger.warning("%s: its input features are not whole blocks; kept in %s", name, module.weight.dtype)
            continue
        summary["layers"][qtype] = summary["layers"].get(qtype, 0) + 1
        summary["float_bytes"] += freed
        summary["quantized_bytes"] += module.qweight.numel()
    head = getattr(model, "lm_head", None)
    if isinstance(head, ParallelLMHead):  # the largest matrix of a small model: read at every decode step
        sources = {t for tensor, t in source_types.items() if tensor in ("lm_head.weight", "model.embed_tokens.weight")}
        sources = {source_types["lm_head.weight"]} if "lm_head.weight" in source_types else sources
        qtype = "Q8_0" if mode in ("int8", "int4") else layer_type(mode, sources)  # int4 keeps the head 8-bit
        tied = any(p is head.weight for name, p in model.named_parameters(remove_duplicate=False) if not name.startswith("lm_head."))
        float_bytes = head.weight.numel() * head.weight.element_size()
        if qtype is not None and head.quantize_(qtype, keep_float=tied):  # a tied head's weight is the embedding's
            summary["layers"][f"{qtype} (LM head)"] = 1
            summary["quantized_bytes"] += head.qweight.numel()
            summary["float_bytes"] += 0 if tied else float_bytes
    return summary


def _recording_types(weights: Iterator[tuple[str, LoadedWeight]], types: dict[str, str]) -> Iterator[tuple[str, LoadedWeight]]:
    """The weights, noting each GGUF tensor's type under its checkpoint name as it passes."""
    for name, loaded in weights:
        info = getattr(loaded, "info", None)
        if info is not None:
            types[name] = info.type_name
        yield name, loaded
