"""The tensor-parallel process group: one scheduler process per rank, joined by torch.distributed.

    TpGroup.init(args, rank)  TCP rendezvous at `dist_init_addr` (rank 0 hosts the store), then
                              a `gloo` group on CPU or an `nccl` group on CUDA for the model's
                              all-reduce / all-gather, plus a gloo group for the scheduler's
                              CPU-side broadcasts (messages, grammar outcomes, sampled tokens).

The layers use the default group (`torch.distributed.all_reduce`), so they need no handle; the
scheduler keeps the `TpGroup` it was given. Every collective has a timeout (`LOOM_DIST_TIMEOUT_S`,
default 300 s): a rank that dies closes its sockets and its peers fail at once, and a rank that
hangs fails them after the timeout, never a hang for ever.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import torch.distributed as dist

from loom.runtime.model_executor.device import resolve_device
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # long enough for a rank that loads a large checkpoint more slowly than its peers

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()
STOP = -1  # a broadcast length that tells the other ranks to exit


def dist_timeout_s() -> float:
    return float(os.environ.get("LOOM_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))


class RankStopped(SystemExit):
    """Rank 0 told this rank to stop (the server is shutting down)."""

    def __init__(self) -> None:
        super().__init__(0)


@dataclass(slots=True)
class TpGroup:
    rank: int
    size: int
    local_rank: int  # the rank's index on its node: which GPU it drives
    device: torch.device
    cpu_group: Any  # gloo group for objects; the default group itself on CPU

    @classmethod
    def init(cls, args: ServerArgs, rank: int) -> TpGroup:
        """Join the group as `rank` (0 <= rank < args.tp_size); blocks until every rank has joined.

        Raises RuntimeError (from torch) when the rendezvous does not complete within the timeout."""
        assert args.dist_init_addr, "the spawner resolves dist_init_addr before starting the ranks"
        assert 0 <= rank < args.tp_size, f"rank {rank} is outside [0, tp_size={args.tp_size})"
        local_rank = rank % args.tp_per_node
        device = resolve_device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", args.base_gpu_id + local_rank)  # one GPU per rank of this node
            torch.cuda.set_device(device)
        timeout = datetime.timedelta(seconds=dist_timeout_s())
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://{args.dist_init_addr}", world_size=args.tp_size, rank=rank, timeout=timeout
        )
        # NCCL cannot broadcast CPU objects; the scheduler's small broadcasts go over gloo always.
        cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
        logger.info("tensor-parallel rank %d of %d joined at %s (%s, %s)", rank, args.tp_size, args.dist_init_addr, backend, device)
        return cls(rank, args.tp_size, local_rank, device, cpu_group)

    # ------------------------------------------------------------------ CPU-side collectives (rank 0 -> all)
    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """Rank 0 passes its bytes (None: STOP), the others None; every rank returns rank 0's bytes.

        Raises RankStopped on the other ranks when rank 0 sent STOP."""
        header = torch.tensor([STOP if data is None else len(data)], dtype=torch.int64)
        dist.broadcast(header, 0, group=self.cpu_group)
        n = int(header.item())
        if n == STOP:
            if self.rank != 0:
                raise RankStopped()
            return b""
        if n == 0:
            return b""
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == 0 else torch.empty(n, dtype=torch.uint8)
        dist.broadcast(buf, 0, group=self.cpu_group)
        return data if self.rank == 0 else buf.numpy().tobytes()

    def broadcast_object(self, obj: Any) -> Any:
        """A msgpack-able object from rank 0 to all (never pickle: peers may sit on other machines)."""
        data = self.broadcast_bytes(_encoder.encode(obj) if self.rank == 0 else b"")
        return _decoder.decode(data)

    def broadcast_ids(self, ids: list[int] | None, n: int) -> list[int]:
        """Rank 0's `n` token ids to every rank (the others pass None)."""
        t = torch.tensor(ids, dtype=torch.int64) if self.rank == 0 else torch.empty(n, dtype=torch.int64)
        assert t.numel() == n, f"rank 0 sampled {t.numel()} tokens for {n} rows"
        dist.broadcast(t, 0, group=self.cpu_group)
        return t.tolist()

    def stop_others(self) -> None:
        """Rank 0, on its way out: the other ranks leave their loops and exit 0."""
        assert self.rank == 0
        self.broadcast_bytes(None)

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    @staticmethod
    def destroy() -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
