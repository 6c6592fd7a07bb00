"""GPTQ and AWQ checkpoints written on the fly for the tests.

`write_quantized_checkpoint` takes a tiny float checkpoint (`loom.checkpoint_writer`) and quantizes
its decoder's linear weights to 4 bits per group, asymmetric (GPTQ's min/max grid) or symmetric
(zero 8), then packs them as the quantizers do:
- GPTQ (AutoGPTQ's `QuantLinear.pack`): qweight int32 [in / 8, out], input feature 8 r + j in bits
  4 j of row r; qzeros int32 [groups, out / 8] packed the same way along the outputs, holding
  zero - 1 in the classic format ("gptq") and the zero in "gptq_v2"; scales fp16 [groups, out];
  g_idx int32 [in] (act-order: a random order of the features, `g_idx[order[k]] = k // group_size`).
- AWQ (AutoAWQ's GEMM `WQLinear_GEMM.from_linear`): qweight int32 [in, out / 8] and qzeros int32
  [groups, out / 8] packed along the outputs, the word's 4-bit field i holding output 8 c + ORDER[i],
  ORDER = [0, 2, 4, 6, 1, 3, 5, 7]; scales fp16 [groups, out].
Embeddings, norms and the LM head stay float, as in the real checkpoints.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_groups(w: np.ndarray, g_idx: np.ndarray, groups: int, sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w float32 [out, in] -> (codes uint8 [out, in], zeros int [groups, out], scales fp16 [groups, out]),
    each group the input features with that g_idx (GPTQ's grid: min and max widened to include 0)."""
    out = w.shape[0]
    codes = np.zeros(w.shape, np.uint8)
    zeros, scales = np.zeros((groups, out), np.int64), np.zeros((groups, out), np.float16)
    for g in range(groups):
        cols = g_idx == g
        wg = w[:, cols]
        lo, hi = np.minimum(wg.min(1), 0), np.maximum(wg.max(1), 0)
        if sym:
            hi = np.maximum(-lo, hi)
            lo = -hi
        scale = ((hi - lo) / 15).astype(np.float16)
        scale = np.where(scale == 0, np.float16(1e-3), scale).astype(np.float16)
        zero = np.full(out, 8) if sym else np.clip(np.round(-lo / scale.astype(np.float32)), 0, 15).astype(np.int64)
        q = np.round(wg / scale.astype(np.float32)[:, None]) + zero[:, None]
        codes[:, cols] = np.clip(q, 0, 15).astype(np.uint8)
        zeros[g], scales[g] = zero, scale
    return codes, zeros, scales


def _pack(fields: np.ndarray, axis: int, order: tuple[int, ...] = tuple(range(8))) -> np.ndarray:
    """uint 4-bit fields -> int32 words of 8 along `axis`; the word's field i takes element ORDER[i] of its 8."""
    f = np.moveaxis(fields.astype(np.uint32) & 0xF, axis, -1)
    f = f.reshape(*f.shape[:-1], -1, 8)
    words = np.zeros(f.shape[:-1], np.uint32)
    for i, k in enumerate(order):
        words |= f[..., k] << np.uint32(4 * i)
    return np.moveaxis(words, -1, axis).view(np.int32)


def pack_gptq(codes: np.ndarray, zeros: np.ndarray, v2: bool) -> tuple[np.ndarray, np.ndarray]:
    """-> (qweight [in / 8, out], qzeros [groups, out / 8]); the classic format stores zero - 1."""
    stored = zeros if v2 else zeros - 1
    return _pack(codes.T, 0), _pack(stored, 1)


def pack_awq(codes: np.ndarray, zeros: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """-> (qweight [in, out / 8], qzeros [groups, out / 8]), both in AWQ's interleaved order."""
    return _pack(codes.T, 1, AWQ_PACK_ORDER), _pack(zeros, 1, AWQ_PACK_ORDER)


def write_quantized_checkpoint(src: pathlib.Path, dst: pathlib.Path, method: str = "gptq", *, group_size: int = 128,
                               sym: bool = False, desc_act: bool = False, checkpoint_format: str = "gptq", seed: int = 0,
                               drop: tuple[str, ...] = (), config: dict[str, Any] | None = None,
                               shared_order: bool = True) -> pathlib.Path:  # fmt: skip
    """`src`'s checkpoint with its decoder linears quantized as `method` ("gptq" / "awq") into `dst`.
    `drop` leaves tensors out; `config` overrides keys of the written quantization_config;
    `shared_order=False` gives every act-order projection its own order (q, k and v differ)."""
    dst.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.suffix != ".safetensors" and file.name != "model.safetensors.index.json":
            shutil.copy(file, dst / file.name)
    rng = np.random.default_rng(seed)
    state = load_file(str(src / "model.safetensors"))
    written: dict[str, np.ndarray] = {}
    orders: dict[str, np.ndarray] = {}  # act-order: projections of one input (q/k/v, gate/up) share it, as GPTQ's Hessian does
    for name, tensor in state.items():
        prefix, _, last = name.rpartition(".")
        if last != "weight" or prefix.rpartition(".")[2] not in LINEAR:
            written[name] = tensor
            continue
        w = tensor.astype(np.float32)
        in_features = w.shape[1]
        size = in_features if group_size == -1 else group_size
        groups = in_features // size
        g_idx = np.arange(in_features) // size
        if desc_act:
            parent, _, proj = prefix.rpartition(".")
            key = f"{parent}.{'qkv' if proj in LINEAR[:3] else 'gate_up' if proj in LINEAR[4:6] else proj}" if shared_order else prefix
            if key not in orders:
                orders[key] = rng.permutation(in_features)
            order = orders[key]
            g_idx[order] = np.arange(in_features) // size
        codes, zeros, scales = quantize_groups(w, g_idx, groups, sym)
        if method == "gptq":
            qweight, qzeros = pack_gptq(codes, zeros, checkpoint_format == "gptq_v2")
            written[f"{prefix}.g_idx"] = g_idx.astype(np.int32)
        else:
            qweight, qzeros = pack_awq(codes, zeros)
        written |= {f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": scales}
    save_file({k: np.ascontiguousarray(v) for k, v in written.items() if k not in drop}, str(dst / "model.safetensors"))
    quant: dict[str, Any] = {"quant_method": method, "bits": 4, "group_size": group_size}
    if method == "gptq":
        quant |= {"desc_act": desc_act, "sym": sym, "checkpoint_format": checkpoint_format}
    else:
        quant |= {"zero_point": True, "version": "gemm"}
    config_path = dst / "config.json"
    config_json = json.loads(config_path.read_text())
    config_json["quantization_config"] = quant | (config or {})
    config_path.write_text(json.dumps(config_json, indent=2))
    return dst
