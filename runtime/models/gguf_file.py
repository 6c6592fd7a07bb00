"""A GGUF file as Loom reads it: where it is, its metadata and its tensor table, checked.

`--model` may name a `.gguf` file, or a folder that holds exactly one (a folder with a
`config.json` is a Hugging Face checkpoint and keeps that path). The `gguf` package parses the
header; everything here is read once per process and file (`read_gguf`), without the tensor data,
which `gguf_loader.py` maps from the file when the weights are loaded.

Every problem with the file is a `GGUFError` (a ValueError) that names the file, the key or
tensor at fault, and what Loom supports.
"""

from __future__ import annotations

import functools
import math
import mmap
import os
import pathlib
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
# The tensor types Loom dequantises at load (gguf.quants.dequantize, as Transformers does).
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


class GGUFError(ValueError):
    """A GGUF file Loom cannot read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table. `shape` is in torch order (rows first), unlike ggml's."""

    name: str
    type_name: str  # the ggml type, e.g. "Q4_K"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF header: metadata values (str, int, float, bool or lists of them) and tensors."""

    path: pathlib.Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str:
        return self.require("general.architecture")

    def require(self, key: str) -> Any:
        """The value of `key`; GGUFError naming the file and the key when it is absent."""
        if key not in self.metadata:
            raise GGUFError(f"{self.path}: the metadata has no {key!r}, which Loom needs to build the model")
        return self.metadata[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def find_gguf_file(model_path: str | os.PathLike) -> pathlib.Path | None:
    """The GGUF file `model_path` names, or None for a Hugging Face folder (or a hub id).

    A file is taken as GGUF whatever its name (its magic number is checked when read); a folder
    is GGUF when it has no config.json and holds exactly one `*.gguf`.

    Raises:
        GGUFError: a folder without config.json that holds several `.gguf` files.
    """
    path = pathlib.Path(model_path)
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise GGUFError(f"{path} holds {len(found)} .gguf files ({names}) and no config.json; pass the one to load as --model")
    return found[0] if found else None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The checked header of the GGUF file at `path`, parsed once per process while the file is unchanged.

    Raises:
        GGUFError: not a GGUF file (wrong magic), an unreadable version, a truncated or corrupt
            header, a tensor whose data runs past the end of the file, or a tensor type Loom
            does not support.
        FileNotFoundError: no such file.
    """
    resolved = pathlib.Path(path).resolve()
    stat = resolved.stat()
    return _read_gguf(resolved, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: pathlib.Path, size: int, mtime_ns: int) -> GGUFFile:
    with open(path, "rb") as f:
        magic = f.read(4)
    if len(magic) < len(GGUF_MAGIC) and GGUF_MAGIC.startswith(magic):
        raise GGUFError(f"{path}: truncated: the file has {size} bytes, not even the GGUF header")
    if magic != GGUF_MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r}); "
            "--model takes a .gguf file or a Hugging Face folder with config.json"
        )
    metadata, tensors = _read_header(path, size)
    for info in tensors.values():
        if info.offset + info.nbytes > size:
            raise GGUFError(
                f"{path}: truncated: tensor {info.name!r} needs bytes up to {info.offset + info.nbytes}, "
                f"but the file ends at {size}"
            )
        if info.type_name not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {info.name!r} has type {info.type_name}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
    file = GGUFFile(path, metadata, tensors)
    file.require("general.architecture")
    return file


class _Truncated(Exception):
    def __init__(self, needed: int, tensor: str | None = None) -> None:
        super().__init__(needed, tensor)
        self.needed, self.tensor = needed, tensor


# GGUF metadata value types: id -> (struct format, size) for the scalars; 8 is a string, 9 an array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}  # fmt: skip
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_DEPTH = 8


class _HeaderReader:
    """A cursor over the header bytes; every read is bound-checked (_Truncated past the end)."""

    def __init__(self, buf: Any, size: int) -> None:
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int) -> int:
        start, self.pos = self.pos, self.pos + n
        if self.pos > self.size:
            raise _Truncated(self.pos)
        return start

    def scalar(self, kind: int) -> Any:
        fmt, n = _SCALARS[kind]
        return struct.unpack_from(fmt, self.buf, self.need(n))[0]

    def string(self) -> str:
        n = self.scalar(10)
        start = self.need(n)
        return bytes(self.buf[start : start + n]).decode("utf-8")

    def value(self, kind: int, depth: int = 0) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise ValueError(f"arrays nested deeper than {MAX_ARRAY_DEPTH}")
            item, count = self.scalar(4), self.scalar(10)
            if item in _NUMPY:  # one numpy read for a whole numeric array (scores, token types)
                dtype = np.dtype(_NUMPY[item])
                start = self.need(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            if item not in (_STRING, _ARRAY):
                raise ValueError(f"unknown metadata value type {item}")
            return [self.value(item, depth + 1) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.scalar(kind)


def _read_header(path: pathlib.Path, size: int) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo]]:
    """The metadata and the tensor table of the GGUF file at `path` (version 2 or 3, little-endian).

    Read here rather than with `gguf.GGUFReader`, which builds numpy views of every value and took
    3.2 s on a 49k-token vocabulary (this: about 0.1 s); every read is bound-checked, so a truncated
    file says where it ends, and a tensor with an unknown type names the tensor.
    """
    import gguf

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        r = _HeaderReader(buf, size)
        try:
            r.need(4)  # the magic, checked by the caller
            version = r.scalar(4)
            if version not in (2, 3):
                swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
                what = "a big-endian file" if swapped in (2, 3) else f"version {version}"
                raise GGUFError(f"{path}: {what}; Loom reads little-endian GGUF versions 2 and 3")
            n_tensors, n_kv = r.scalar(10), r.scalar(10)
            metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = r.string()
                metadata[key] = r.value(r.scalar(4))
            table = []
            for _ in range(n_tensors):
                name = r.string()
                dims = [r.scalar(10) for _ in range(r.scalar(4))]
                table.append((name, dims, r.scalar(4), r.scalar(10)))
        except _Truncated as exc:
            raise GGUFError(f"{path}: truncated: the header needs bytes up to {exc.needed}, but the file ends at {size}") from None
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{path}: a metadata string is not valid UTF-8 ({exc}); the file is corrupt") from exc
        except (ValueError, OverflowError, MemoryError) as exc:
            raise GGUFError(f"{path}: cannot read the GGUF header: {exc}") from exc
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0:
            raise GGUFError(f"{path}: general.alignment is {alignment!r}; expected a positive int")
        data_start = -(-r.pos // alignment) * alignment
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, dims, type_id, offset in table:
        try:
            qtype = gguf.GGMLQuantizationType(type_id)
        except ValueError:
            raise GGUFError(f"{path}: tensor {name!r} has type id {type_id}, which gguf does not know; "
                            f"supported: {', '.join(SUPPORTED_TYPES)}") from None  # fmt: skip
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        numel = math.prod(dims)
        tensors[name] = GGUFTensorInfo(name, qtype.name, tuple(reversed(dims)), data_start + offset, numel * type_size // block)
    return metadata, tensors
