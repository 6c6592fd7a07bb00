"""GPTQ and AWQ checkpoints (4-bit, Hugging Face safetensors layout), read as vLLM and SGLang read
them, and kept quantized as Loom's Q4_1 blocks.

A linear layer of such a checkpoint is four tensors instead of `weight` [out, in]:

- GPTQ (AutoGPTQ / GPTQModel; vLLM `quantization/gptq.py`, the exllama `gptq_gemm` kernel):
  - `qweight` int32 [in / 8, out]: 8 codes packed along the *input* features; input feature
    8 r + i of output column c sits in bits 4 i .. 4 i + 3 of `qweight[r, c]`;
  - `qzeros` int32 [groups, out / 8]: the zero points packed along the *output* features, in the
    same plain order (output 8 c + i in bits 4 i of `qzeros[g, c]`);
  - `scales` fp16 [groups, out];
  - `g_idx` int32 [in]: the group of each input feature (`i // group_size` unless act-order,
    `desc_act: true`, quantized the features in another order).
  weight[o, i] = scales[g, o] * (code - zero), g = g_idx[i]. The classic format
  (`checkpoint_format` "gptq", AutoGPTQ's) stores zero - 1, so the reader adds 1 back to the 4-bit
  field ((stored & 0xF) + 1, as vLLM's kernel does, which makes a stored 0xF a zero of 16);
  "gptq_v2" (GPTQModel) stores the zero itself.
- AWQ (AutoAWQ's GEMM layout, `version: "gemm"`; vLLM `quantization/awq.py`, `awq_triton.py`):
  - `qweight` int32 [in, out / 8] and `qzeros` int32 [groups, out / 8]: packed along the *output*
    features, interleaved: the 4-bit field i of a word holds output 8 c + ORDER[i] with
    ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (unpacked through AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]);
  - `scales` fp16 [groups, out]; groups are contiguous (no g_idx); zeros are stored as they are.
  weight[o, i] = scales[i // group_size, o] * (code - zero).

Loom keeps such a layer as Q4_1 blocks (`kernels/cpu`): 32 weights w = d * q + m with fp16 d and m,
which is exactly one group of asymmetric int4 when d = scale and m = -zero * scale (a group of 64
or 128 is 2 or 4 blocks with the same d and m). The code q is the file's own; m is rounded to fp16
(exact when zero * scale needs no more than 11 significant bits, e.g. the symmetric zero 8;
otherwise off by at most half an fp16 ulp, 2^-11 of |zero * scale|). With act-order the layer's
input features are stored sorted by group (a stable sort, so plain checkpoints keep their order)
and the layer permutes its input to match (`LinearBase.input_perm`), as vLLM's Marlin path does.

How it plugs into the loader: each quantized projection is one `PackedLinear`, yielded under the
name `<module>.weight`. It reads as the float weight (dequantising what a rank's loader indexes),
so `quantization="none"`, a device without a Q4_1 kernel, packed q/k/v and gate/up, and tensor
parallelism all go through the layers' own `weight_loader`s unchanged. Under `auto` where Q4_1 has a
kernel (the CPU; CUDA with Triton, not yet run on a GPU), `QuantizedAssembler` routes
a `PackedLinear` to the same `weight_loader`, twice, with two integer views of it: the codes, and
a key per weight naming its (scale, zero) entry. A layer whose 32-weight blocks each share one
entry becomes Q4_1 blocks; any other (a tensor-parallel shard of act-order input features whose
groups do not fall into whole blocks, input features not a multiple of 32) is dequantised into
`dtype` with a warning. The embedding and the LM head stay float.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from loom.kernels.cpu import BLOCK
from loom.runtime.layers.linear import LinearBase, LoadedWeight, MergedColumnParallelLinear, QKVParallelLinear, loaded_shape
from loom.runtime.layers.quantized import runs_on

logger = logging.getLogger(__name__)

METHODS = ("gptq", "awq")
GPTQ_FORMATS = ("gptq", "gptq_v2")
AWQ_VERSIONS = ("gemm",)
PARTS = ("qweight", "qzeros", "scales", "g_idx")
PACK = 8  # 4-bit codes per int32
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical output k of a word is its 4-bit field AWQ_REVERSE_ORDER[k]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


class QuantizedCheckpointError(ValueError):
    """A GPTQ / AWQ checkpoint Loom cannot run; the message names the setting or tensor and what is supported."""


@dataclass(frozen=True)
class QuantScheme:
    """A checkpoint's `quantization_config`, checked."""

    method: str  # gptq | awq
    group_size: int  # -1: one group per row
    desc_act: bool  # GPTQ act-order: g_idx is not i // group_size
    sym: bool
    zero_offset: int  # added to each stored zero: 1 for the classic GPTQ format, else 0
    source: str  # the file the config came from, for messages


def read_quant_scheme(model_dir: pathlib.Path) -> QuantScheme | None:
    """The quantization of a Hugging Face folder: config.json's `quantization_config`, else an
    AutoGPTQ `quantize_config.json` beside it; None for a float checkpoint.

    Raises:
        QuantizedCheckpointError: a method, bit width, group size or format Loom cannot run.
    """
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    quant = config.get("quantization_config")
    if quant is not None:
        return parse_quant_config(quant, str(config_path))
    legacy = model_dir / "quantize_config.json"
    if legacy.is_file():
        return parse_quant_config({"quant_method": "gptq", **json.loads(legacy.read_text())}, str(legacy))
    return None


def parse_quant_config(quant: dict[str, Any], source: str) -> QuantScheme:
    """Check a `quantization_config` dict; QuantizedCheckpointError naming the setting at fault."""

    def refuse(setting: str, value: Any, supported: str) -> QuantizedCheckpointError:
        return QuantizedCheckpointError(f"{source}: quantization_config {setting}={value!r} is not supported; Loom reads {supported}")

    method = str(quant.get("quant_method", "")).lower()
    if method not in METHODS:
        raise refuse("quant_method", quant.get("quant_method"), "gptq and awq safetensors checkpoints (and GGUF files)")
    bits = quant["bits"] if quant.get("bits") is not None else quant.get("w_bit")  # AutoAWQ's own names too
    if bits != 4:
        raise refuse("bits", bits, f"4-bit {method.upper()} only")
    group_size = quant["group_size"] if quant.get("group_size") is not None else quant.get("q_group_size")
    if not isinstance(group_size, int) or not (group_size == -1 or (group_size > 0 and group_size % BLOCK == 0)):
        raise refuse("group_size", group_size, f"-1 (one group per row) or a multiple of {BLOCK} (32, 64, 128, ...)")
    if quant.get("dynamic"):
        raise refuse("dynamic", quant["dynamic"], "one bits / group_size for every layer")
    if method == "gptq":
        fmt = quant.get("checkpoint_format", "gptq")
        if fmt not in GPTQ_FORMATS:
            raise refuse("checkpoint_format", fmt, f"GPTQ checkpoint_format {' or '.join(GPTQ_FORMATS)}")
        return QuantScheme("gptq", group_size, bool(quant.get("desc_act", False)), bool(quant.get("sym", True)),
                           1 if fmt == "gptq" else 0, source)  # fmt: skip
    version = str(quant.get("version", "gemm")).lower()
    if version not in AWQ_VERSIONS:
        raise refuse("version", quant.get("version"), "AWQ version 'gemm' (AutoAWQ's GEMM layout)")
    if quant.get("zero_point", True) is not True:
        raise refuse("zero_point", quant.get("zero_point"), "AWQ with zero_point true (as vLLM)")
    return QuantScheme("awq", group_size, False, False, 0, source)


def check_quantization_mode(scheme: QuantScheme, mode: str) -> None:
    """`int8` / `int4` quantize a float checkpoint; on a GPTQ / AWQ one they are refused."""
    if mode in ("int8", "int4"):
        raise QuantizedCheckpointError(
            f"quantization={mode!r} quantizes a float checkpoint at load, but {scheme.source} is already "
            f"{scheme.method.upper()} 4-bit: use 'auto' to keep its weights quantized or 'none' to dequantise them"
        )


def _unpack(words: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit fields (field i: bits 4 i .. 4 i + 3), spread along `dim` (uint8)."""
    fields = (words.unsqueeze(dim + 1) >> _SHIFTS.view([-1] + [1] * (words.dim() - dim - 1))) & 0xF
    return fields.flatten(dim, dim + 1).to(torch.uint8)


def _read(loaded: LoadedWeight, rows: slice, cols: slice) -> torch.Tensor:
    return loaded[rows, cols]


class PackedLinear:
    """One checkpoint projection's packed tensors (lazy safetensors slices), read as its float
    weight [out, in]: `get_shape()` and `[rows, cols]` (what a layer's weight loader asks of a
    LoadedWeight), dequantising only the shard indexed.

    Raises QuantizedCheckpointError (when built) for missing tensors or shapes unlike the config's.
    """

    def __init__(self, prefix: str, scheme: QuantScheme, parts: dict[str, LoadedWeight | None]) -> None:
        self.prefix, self.scheme = prefix, scheme
        self.qweight, self.qzeros, self.scales, self.g_idx = (parts.get(p) for p in PARTS)
        needed = ["qweight", "scales"] + (["qzeros"] if scheme.method == "awq" or not scheme.sym else [])
        needed += ["g_idx"] if scheme.desc_act else []
        missing = [p for p in needed if parts.get(p) is None]
        if missing:
            raise QuantizedCheckpointError(
                f"{scheme.source}: {prefix} has no {', '.join(missing)} (a {scheme.method.upper()} layer needs {', '.join(needed)})"
            )
        packed = loaded_shape(self.qweight)
        if scheme.method == "gptq":
            self.in_features, self.out_features = packed[0] * PACK, packed[1]
        else:
            self.in_features, self.out_features = packed[0], packed[1] * PACK
        group = self.in_features if scheme.group_size == -1 else scheme.group_size
        if self.in_features % group:
            raise QuantizedCheckpointError(
                f"{scheme.source}: group_size={scheme.group_size} does not divide {prefix}'s {self.in_features} input "
                "features; Loom reads groups that divide every layer's input features"
            )
        self.group, self.groups = group, self.in_features // group
        want = {"scales": (self.groups, self.out_features), "qzeros": (self.groups, self.out_features // PACK),
                "g_idx": (self.in_features,)}  # fmt: skip
        for part, shape in want.items():
            tensor = parts.get(part)
            if tensor is not None and tuple(loaded_shape(tensor)) != shape:
                raise QuantizedCheckpointError(
                    f"{scheme.source}: {prefix}.{part} has shape {tuple(loaded_shape(tensor))}; with qweight "
                    f"{tuple(packed)} and group_size={scheme.group_size} it should be {shape}"
                )
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._group_of: torch.Tensor | None = None

    def get_shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        return self.dequantize(*index)

    def _ranges(self, rows: slice, cols: slice) -> tuple[range, range]:
        r, c = range(*rows.indices(self.out_features)), range(*cols.indices(self.in_features))
        assert r.step == 1 and c.step == 1, f"{self.prefix}: a shard is a contiguous range, got {rows}, {cols}"
        return r, c

    def codes(self, rows: slice, cols: slice) -> torch.Tensor:
        """The 4-bit codes of weight[rows, cols] -> uint8 [rows, cols]; reads only the words holding them."""
        r, c = self._ranges(rows, cols)
        if self.scheme.method == "gptq":  # packed along the input features
            w0, w1 = c.start // PACK, -(-c.stop // PACK)
            words = _read(self.qweight, slice(w0, w1), slice(r.start, r.stop))  # [in words, rows]
            fields = _unpack(words.to(torch.int32), 0)  # [in, rows]
            return fields[c.start - w0 * PACK : c.stop - w0 * PACK].T
        w0, w1 = r.start // PACK, -(-r.stop // PACK)  # AWQ: packed along the output features, interleaved
        words = _read(self.qweight, slice(c.start, c.stop), slice(w0, w1))  # [cols, out words]
        fields = _unpack(words.to(torch.int32), 1).view(len(c), -1, PACK)[..., list(AWQ_REVERSE_ORDER)]
        return fields.reshape(len(c), -1)[:, r.start - w0 * PACK : r.stop - w0 * PACK].T

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(zeros, scales), both float32 [groups, out]: weight = scales[g, o] * (code - zeros[g, o])."""
        if self._tables is None:
            scales = _read(self.scales, slice(None), slice(None)).float()
            if self.qzeros is None:  # symmetric GPTQ without stored zeros: the midpoint
                zeros = torch.full_like(scales, 8.0)
            else:
                fields = _unpack(_read(self.qzeros, slice(None), slice(None)).to(torch.int32), 1)  # [groups, out]
                if self.scheme.method == "awq":
                    fields = fields.view(self.groups, -1, PACK)[..., list(AWQ_REVERSE_ORDER)].reshape(self.groups, -1)
                zeros = fields.float() + self.scheme.zero_offset
            self._tables = zeros, scales
        return self._tables

    def group_of(self) -> torch.Tensor:
        """int64 [in]: each input feature's group (the checkpoint's g_idx where it has one)."""
        if self._group_of is None:
            if self.g_idx is None:
                groups = torch.arange(self.in_features) // self.group
            else:
                groups = self.g_idx[:].long()
                if len(groups) and (int(groups.min()) < 0 or int(groups.max()) >= self.groups):
                    raise QuantizedCheckpointError(
                        f"{self.scheme.source}: {self.prefix}.g_idx names groups outside [0, {self.groups}) "
                        f"(group_size={self.scheme.group_size}, {self.in_features} input features)"
                    )
            self._group_of = groups
        return self._group_of

    def dequantize(self, rows: slice, cols: slice) -> torch.Tensor:
        """weight[rows, cols] as float32: scale * (code - zero), per the layout above."""
        r, c = self._ranges(rows, cols)
        zeros, scales = self.tables()
        groups = self.group_of()[c.start : c.stop]
        z, s = zeros[groups][:, r.start : r.stop].T, scales[groups][:, r.start : r.stop].T  # [rows, cols]
        return (self.codes(rows, cols).float() - z) * s


class _CodeView:
    """A PackedLinear's codes, shaped like its weight, for a layer's weight loader."""

    def __init__(self, packed: PackedLinear) -> None:
        self.packed = packed

    def get_shape(self) -> tuple[int, int]:
        return self.packed.get_shape()

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        return self.packed.codes(*index)


class _KeyView(_CodeView):
    """Per weight, the index of its (scale, zero) entry in the layer's tables: `base + group * out + row`."""

    def __init__(self, packed: PackedLinear, base: int) -> None:
        super().__init__(packed)
        self.base = base

    def __getitem__(self, index: tuple[slice, slice]) -> torch.Tensor:
        r, c = self.packed._ranges(*index)
        groups = self.packed.group_of()[c.start : c.stop]
        keys = self.base + groups.unsqueeze(0) * self.packed.out_features + torch.arange(r.start, r.stop).unsqueeze(1)
        return keys.to(torch.int32)


def iter_quantized_checkpoint(files: list[pathlib.Path], scheme: QuantScheme) -> Iterator[tuple[str, LoadedWeight]]:
    """(name, lazy slice) for every tensor, with each quantized projection's qweight / qzeros /
    scales / g_idx gathered into one PackedLinear named `<module>.weight` (wherever the shards put them)."""
    with contextlib.ExitStack() as stack:
        tensors: dict[str, Any] = {}
        for file in files:
            f = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            tensors.update((name, f.get_slice(name)) for name in f.keys())
        prefixes = sorted({name[: -len(".qweight")] for name in tensors if name.endswith(".qweight")})
        orphans = sorted(n for n in tensors if n.endswith((".qzeros", ".scales", ".g_idx")) and n.rsplit(".", 1)[0] not in prefixes)
        if orphans:
            raise QuantizedCheckpointError(f"{scheme.source}: {orphans[0]} has no qweight beside it")
        for prefix in prefixes:
            parts = {part: tensors.pop(f"{prefix}.{part}", None) for part in PARTS}
            yield f"{prefix}.weight", PackedLinear(prefix, scheme, parts)
        yield from tensors.items()


def keeps_quantized(scheme: QuantScheme | None, mode: str, device: torch.device) -> bool:
    """Whether the checkpoint's layers stay quantized: `auto` where Q4_1 has a kernel (the CPU's, or
    CUDA's Triton one: `layers/quantized.py` `runs_on`); elsewhere they load dequantised."""
    return scheme is not None and mode == "auto" and runs_on(device)


@dataclass
class _Assembly:
    """A layer being filled from its projections: codes and keys [out_per_rank, in_per_rank], and the
    (zero, scale) tables the keys index."""

    codes: torch.Tensor
    keys: torch.Tensor
    expected: int  # projections packed into the layer (q/k/v: 3, gate/up: 2, else 1)
    zeros: list[torch.Tensor] = field(default_factory=list)
    scales: list[torch.Tensor] = field(default_factory=list)
    size: int = 0
    loaded: int = 0

    def add_tables(self, packed: PackedLinear) -> int:
        zeros, scales = packed.tables()
        base = self.size
        self.zeros.append(zeros.reshape(-1))
        self.scales.append(scales.reshape(-1))
        self.size += zeros.numel()
        return base


class QuantizedAssembler:
    """Keeps a GPTQ / AWQ checkpoint's linear layers quantized while `loader.load_weights` runs.

    It wraps the `weight_loader` of every linear layer's weight: a PackedLinear goes to the layer's
    own loader as its codes and keys (so packing and tensor-parallel shards are cut as for a float
    weight), into integer buffers; once a layer has all its projections, they become Q4_1 blocks
    (or, where its blocks would mix groups, its float weight). Anything else loads as before.
    """

    def __init__(self, model: nn.Module) -> None:
        self.pending: dict[LinearBase, _Assembly] = {}
        self.kept: dict[str, int] = {}
        self.names = {module: name for name, module in model.named_modules()}
        self.quantized_bytes = self.float_bytes = 0
        for module in model.modules():
            if isinstance(module, LinearBase) and module.weight is not None:
                module.weight.weight_loader = self._loader_for(module, module.weight.weight_loader)

    def _loader_for(self, layer: LinearBase, original: Any) -> Any:
        def weight_loader(param: nn.Parameter, loaded: LoadedWeight, shard_id: Any = None) -> None:
            if not isinstance(loaded, PackedLinear):
                original(param, loaded, shard_id)
                return
            asm = self.pending.get(layer)
            if asm is None:
                shape = tuple(param.shape)
                expected = 3 if isinstance(layer, QKVParallelLinear) else 1
                if isinstance(layer, MergedColumnParallelLinear):
                    expected = len(layer.output_sizes)
                asm = self.pending[layer] = _Assembly(torch.zeros(shape, dtype=torch.uint8),
                                                      torch.full(shape, -1, dtype=torch.int32), expected)  # fmt: skip
            base = asm.add_tables(loaded)
            original(asm.codes, _CodeView(loaded), shard_id)
            original(asm.keys, _KeyView(loaded, base), shard_id)
            asm.loaded += 1
            if asm.loaded == asm.expected:
                self._finish_layer(layer, self.pending.pop(layer))

        return weight_loader

    def _finish_layer(self, layer: LinearBase, asm: _Assembly) -> None:
        name = self.names.get(layer, type(layer).__name__)
        assert bool((asm.keys >= 0).all()), f"{name}: some weights were not loaded from the checkpoint"
        zeros, scales = torch.cat(asm.zeros), torch.cat(asm.scales)
        out, cols = asm.keys.shape
        # Row 0's keys grow with the group, so this orders the input features by group; the sort is
        # stable, so features already in group order (no act-order) keep their order.
        order = torch.argsort(asm.keys[0].long(), stable=True)
        perm = None if torch.equal(order, torch.arange(cols)) else order
        keys, codes = (asm.keys, asm.codes) if perm is None else (asm.keys[:, perm], asm.codes[:, perm])
        blocks = None
        if cols % BLOCK == 0:
            kb = keys.view(out, cols // BLOCK, BLOCK)
            if torch.equal(kb, kb[..., :1].expand_as(kb)):  # each block within one (scale, zero) entry
                blocks = q4_1_blocks(codes.view(out, -1, BLOCK), zeros[kb[..., 0].long()], scales[kb[..., 0].long()])
        if blocks is None:
            keys = asm.keys.long()
            layer.weight.data.copy_((asm.codes.float() - zeros[keys]) * scales[keys])
            logger.warning("%s: its input features (act-order groups on this rank, or not whole %d-weight blocks) do not "
                           "fall into whole blocks of one group; dequantised into %s", name, BLOCK, layer.weight.dtype)  # fmt: skip
            self.kept["float (dequantised)"] = self.kept.get("float (dequantised)", 0) + 1
            return
        self.float_bytes += layer.load_quantized_(blocks, "Q4_1", perm)
        self.quantized_bytes += blocks.numel()
        self.kept["Q4_1"] = self.kept.get("Q4_1", 0) + 1

    def finish(self) -> dict[str, Any]:
        """After loading: a summary for the log (layers by how they are kept, bytes before and after).
        QuantizedCheckpointError where a packed layer got only some of its projections quantized."""
        if self.pending:
            layer, asm = next(iter(self.pending.items()))
            raise QuantizedCheckpointError(
                f"{self.names.get(layer)}: {asm.loaded} of its {asm.expected} projections are quantized in the checkpoint "
                "and the others are not; Loom packs them into one layer and needs all quantized or none"
            )
        return {"layers": dict(self.kept), "float_bytes": self.float_bytes, "quantized_bytes": self.quantized_bytes}


def q4_1_blocks(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, B, 32], zeros and scales float32 [N, B] -> Q4_1 blocks uint8 [N, B * 20]:
    d = scale, m = -zero * scale (both fp16), then 16 bytes holding code j in the low nibble of
    byte j and code j + 16 in its high nibble (ggml's block_q4_1)."""
    d = scales.half().unsqueeze(-1).view(torch.uint8)  # [N, B, 2]
    m = (-zeros * scales).half().unsqueeze(-1).view(torch.uint8)
    qs = codes[..., : BLOCK // 2] | (codes[..., BLOCK // 2 :] << 4)
    return torch.cat([d, m, qs], dim=-1).reshape(codes.shape[0], -1)
