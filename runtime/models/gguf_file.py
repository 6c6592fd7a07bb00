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
import os
import pathlib
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
    reader = _read_header(path, size)
    try:
        metadata = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    except UnicodeDecodeError as exc:
        raise GGUFError(f"{path}: a metadata string is not valid UTF-8 ({exc}); the file is corrupt") from exc
    tensors: dict[str, GGUFTensorInfo] = {}
    for t in reader.tensors:
        info = GGUFTensorInfo(
            name=t.name,
            type_name=t.tensor_type.name,
            shape=tuple(int(d) for d in reversed(t.shape.tolist())),
            offset=int(t.data_offset),
            nbytes=int(t.n_bytes),
        )
        if info.offset + info.nbytes > size:
            raise GGUFError(
                f"{path}: truncated: tensor {info.name!r} needs bytes up to {info.offset + info.nbytes}, "
                f"but the file ends at {size}"
            )
        if info.type_name not in SUPPORTED_TYPES:
            raise GGUFError(
                f"{path}: tensor {info.name!r} has type {info.type_name}; supported: {', '.join(SUPPORTED_TYPES)}"
            )
        tensors[info.name] = info
    file = GGUFFile(path, metadata, tensors)
    file.require("general.architecture")
    return file


class _Truncated(Exception):
    def __init__(self, needed: int, tensor: str | None = None) -> None:
        super().__init__(needed, tensor)
        self.needed, self.tensor = needed, tensor


def _read_header(path: pathlib.Path, size: int) -> Any:
    """gguf's reader over `path`, made to stop at the end of the file and to run quickly.

    `GGUFReader._get` slices the file's np.memmap for every value; a memmap's slicing costs ~4x an
    ndarray's, which made a 49k-token vocabulary take ~3 s to parse. Reading through a plain
    ndarray view of the same map, with a bound check (a truncated file raises instead of handing
    back a short array), parses it in well under one. The tensor table is checked before gguf
    maps the tensors, so that a truncated file or an unknown type names its tensor.
    """
    import gguf

    class Reader(gguf.GGUFReader):
        _plain: np.ndarray | None = None

        def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
            if self._plain is None:
                self._plain = self.data.view(np.ndarray)
            count = int(count)
            dt = np.dtype(dtype)
            end = offset + dt.itemsize * count
            if end > self._plain.shape[0]:
                raise _Truncated(end)
            arr = self._plain[offset:end].view(dt)
            order = self.byte_order if override_order is None else override_order
            return arr.view(arr.dtype.newbyteorder(order))

        def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise GGUFError(f"{path}: tensor {name!r} has type id {int(raw_type[0])}, which gguf does not know; "
                                    f"supported: {', '.join(SUPPORTED_TYPES)}") from None  # fmt: skip
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.uint64)) * type_size // block
                if end > size:
                    raise _Truncated(end, name)
            super()._build_tensors(start_offs, fields)

    try:
        return Reader(path)
    except _Truncated as exc:
        what = f"tensor {exc.tensor!r}" if exc.tensor else "the header"
        raise GGUFError(f"{path}: truncated: {what} needs bytes up to {exc.needed}, but the file ends at {size}") from None
    except (ValueError, KeyError, IndexError, OverflowError) as exc:
        if isinstance(exc, GGUFError):
            raise
        raise GGUFError(f"{path}: cannot read the GGUF header: {exc}") from exc
