"""KV cache memory: request rows, KV slot allocation, and the per-layer K/V buffers.

Three pieces, as in SGLang:

- `ReqToTokenPool`: one row per running request; row `r` column `i` holds the KV slot of the
  request's `i`-th token.
- `TokenToKVPoolAllocator`: hands out KV slots `1..size` (slot 0 is reserved: padded tokens
  write their K/V there, so it must never hold a real token).
- `TokenToKVPool`: the K and V buffers themselves, `[size + 1, kv_heads, head_dim]` per layer.

Memory policy. The pool is the prefix cache's one budget: `size` slots (`max_total_tokens`, by
default a `mem_fraction_static` share of free memory), fixed at start-up and never exceeded; the
cache keeps what it has computed until a new request needs the room (LRU eviction). On the CPU the
buffers are private zero pages that become resident as slots are first written (the allocator hands
slots out in turn, so: as tokens are computed), up to the budget and no further;
`release_pages()` (called by /flush_cache, once every slot is free) hands them back to the kernel.
"""

from __future__ import annotations

import math
import mmap

import torch


class ReqToTokenPool:
    """Maps a request row to the KV slots of its tokens."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device = "cpu") -> None:
        assert size > 0 and max_context_len > 0, f"need a positive pool shape, got {size} x {max_context_len}"
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        # int64 so a row slice indexes the KV buffers directly.
        self.req_to_token = torch.zeros(size, max_context_len, dtype=torch.int64, device=self.device)  # [rows, ctx]
        self._free_rows: list[int] = list(range(size))

    def alloc(self, n: int = 1) -> list[int] | None:
        """Take `n` free rows, or None (taking nothing) when fewer than `n` are free."""
        if n > len(self._free_rows):
            return None
        rows, self._free_rows = self._free_rows[:n], self._free_rows[n:]
        return rows

    def free(self, idx: int | list[int]) -> None:
        """Give rows back. The row contents are left as they are (the next owner overwrites them)."""
        if isinstance(idx, int):
            self._free_rows.append(idx)
        else:
            self._free_rows.extend(int(i) for i in idx)

    def available_size(self) -> int:
        return len(self._free_rows)

    def clear(self) -> None:
        self._free_rows = list(range(self.size))


class TokenToKVPoolAllocator:
    """Hands out KV slots 1..size; slot 0 is reserved (padding writes go there).

    The free list is one int64 tensor: `alloc` slices its head, `free` concatenates onto its
    tail, so neither walks the slots in Python.
    """

    def __init__(self, size: int, device: str | torch.device = "cpu") -> None:
        assert size > 0, f"the KV pool needs at least one slot, got size={size}"
        self.size = size
        self.device = torch.device(device)
        self.clear()

    def alloc(self, n: int) -> torch.Tensor | None:
        """Take `n` slots -> int64 [n], or None (taking nothing) when fewer than `n` are free."""
        if n > self._free.numel():
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

    def free(self, indices: torch.Tensor) -> None:
        """Give slots back; an empty tensor is a no-op. No double-free check (see `free_slots`)."""
        if indices.numel() == 0:
            return
        self._free = torch.cat((self._free, indices.to(device=self.device, dtype=torch.int64).reshape(-1)))

    def available_size(self) -> int:
        return int(self._free.numel())

    def clear(self) -> None:
        self._free = torch.arange(1, self.size + 1, dtype=torch.int64, device=self.device)

    def free_slots(self) -> torch.Tensor:
        """Debug aid: a copy of the free list (for invariant checks in tests)."""
        return self._free.clone()


FP8_E4M3_MAX = 448.0
# fp8 scales are set from the first K/V a layer stores: its largest magnitude times this margin
# maps to the top of the fp8 range, so later, larger values still fit (beyond it they saturate).
FP8_CALIBRATION_MARGIN = 4.0


def zeroed_buffers(
    count: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[list[torch.Tensor], mmap.mmap | None]:
    """`count` zero tensors of `shape`, and on the CPU the memory map they are views of (else None).

    On the CPU the map is private and anonymous: the kernel hands out zero pages only when a slot is
    first written, so a pool of several GiB costs nothing at start-up (torch.zeros wrote every byte
    of it: 8.6 s for the default pool of a 135M model) and its resident memory grows with the tokens
    actually cached. Private, not shared (mmap's default), so that MADV_DONTNEED frees the pages
    (`release_pages`); shared anonymous memory would stay resident until the map is closed."""
    if device.type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(count)], None
    numel = math.prod(shape)
    stride = -(-numel * dtype.itemsize // mmap.PAGESIZE) * mmap.PAGESIZE  # each buffer starts on a page
    mapping = mmap.mmap(-1, max(stride * count, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_DONTDUMP"):
        # GiBs of KV are of no use in a core dump; the flag also keeps the pool a map of its own
        # (not merged with its neighbours), shown with `dd` in /proc/PID/smaps' VmFlags.
        mapping.madvise(mmap.MADV_DONTDUMP)
    raw = torch.frombuffer(mapping, dtype=torch.uint8)  # shares the mapping, which stays open as long as `raw` lives
    return [raw[i * stride : i * stride + numel * dtype.itemsize].view(dtype).view(shape) for i in range(count)], mapping


class TokenToKVPool:
    """Per-layer K and V buffers [size + 1, kv_heads, head_dim] (row 0 = reserved slot).

    `kv_dtype=torch.float8_e4m3fn` stores K and V in fp8 with one scale per layer for K and one for
    V (given, or calibrated on the layer's first write); `dequantize` turns gathered rows back into
    the compute `dtype`. Attention backends call it whenever `quantized` is set."""

    def __init__(
        self,
        size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str | torch.device = "cpu",
        kv_dtype: torch.dtype | None = None,
        scales: tuple[list[float], list[float]] | None = None,
    ) -> None:
        self.size = size
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self.quantized = self.kv_dtype == torch.float8_e4m3fn
        if kv_dtype is not None and kv_dtype.is_floating_point and kv_dtype.itemsize == 1 and not self.quantized:
            raise ValueError(f"fp8 KV cache supports float8_e4m3fn, got {kv_dtype}")
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        buffers, self._mapping = zeroed_buffers(2 * layer_num, (size + 1, head_num, head_dim), self.kv_dtype, self.device)
        self.k_buffer: list[torch.Tensor] = buffers[:layer_num]
        self.v_buffer: list[torch.Tensor] = buffers[layer_num:]
        self.k_scale: list[float | None] = list(scales[0]) if scales else [None] * layer_num
        self.v_scale: list[float | None] = list(scales[1]) if scales else [None] * layer_num

    def release_pages(self) -> None:
        """Give the buffers' memory back to the kernel; every slot reads zero again afterwards.
        Only while no slot holds a token the cache or a request still needs (after a flush).
        A no-op off the CPU, where the buffers are allocated once, whole."""
        if self._mapping is not None:
            self._mapping.madvise(mmap.MADV_DONTNEED)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]  # [size + 1, Hkv, D]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]  # [size + 1, Hkv, D]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v [T, Hkv, D] into slots loc [T] of one layer, cast (or quantized) to the pool's KV dtype."""
        if self.quantized:
            k_scale, v_scale = self.kv_scales(layer_id, k, v)
            k = _quantize(k, k_scale)
            v = _quantize(v, v_scale)
        if k.dtype != self.kv_dtype:
            k = k.to(self.kv_dtype)
        if v.dtype != self.kv_dtype:
            v = v.to(self.kv_dtype)
        self.k_buffer[layer_id][loc] = k
        self.v_buffer[layer_id][loc] = v

    def kv_scales(self, layer_id: int, k: torch.Tensor, v: torch.Tensor) -> tuple[float, float]:
        """The layer's fp8 (K, V) scales; a layer without them yet takes them from this k/v [T, Hkv, D]
        (its first write). Every writer of an fp8 pool (this pool, the Triton store kernel) goes through here."""
        if self.k_scale[layer_id] is None:
            self.k_scale[layer_id] = _fp8_scale(k)
            self.v_scale[layer_id] = _fp8_scale(v)
        return self.k_scale[layer_id], self.v_scale[layer_id]

    def dequantize(self, layer_id: int, which: str, rows: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows gathered from this layer's K ("k") or V ("v") buffer -> `dtype` (default: the compute dtype)."""
        dtype = dtype or self.dtype
        if not self.quantized:
            return rows if rows.dtype == dtype else rows.to(dtype)
        scale = (self.k_scale if which == "k" else self.v_scale)[layer_id]
        return rows.to(dtype).mul_(1.0 if scale is None else scale)

    @staticmethod
    def bytes_per_token(dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int) -> int:  # dtype: the KV dtype
        """Bytes one token's K and V take over all layers."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * head_num * head_dim * layer_num * itemsize

    @classmethod
    def size_for_budget(cls, budget_bytes: int, dtype: torch.dtype, head_num: int, head_dim: int, layer_num: int) -> int:
        """The largest `size` whose buffers (size + 1 rows, counting the reserved slot) fit the budget."""
        per_token = cls.bytes_per_token(dtype, head_num, head_dim, layer_num)
        return max(budget_bytes // per_token - 1, 0)

    def mem_bytes(self) -> int:
        """Bytes held by all K and V buffers."""
        return sum(b.numel() * b.element_size() for b in self.k_buffer + self.v_buffer)


def _fp8_scale(x: torch.Tensor) -> float:
    amax = float(x.detach().abs().amax()) if x.numel() else 0.0
    return max(amax * FP8_CALIBRATION_MARGIN / FP8_E4M3_MAX, 1e-6)


def _quantize(x: torch.Tensor, scale: float) -> torch.Tensor:
    # Times the reciprocal, not divided: CUDA's torch multiplies by the reciprocal of a scalar divisor and the
    # CPU's divides, so this is the one form every device (and the Triton store kernel) rounds alike.
    return (x.float() * (1.0 / scale)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
