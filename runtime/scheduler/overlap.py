"""The overlap worker: decode steps run on a thread of their own, so the scheduler prepares step
N+1 (and processes step N-1's tokens) while step N computes. SGLang's TpModelWorkerClient, small.

    scheduler thread                          forward thread (one; steps run in launch order)
    launch(N): ids with future refs ───────►  resolve refs <- future map ─ forward ─ sample
                                              ─ future map[N's entries] = ids ─ copy ids to host
    launch(N+1) (refs to N's entries) ─────►  (waits behind N)
    InflightStep(N).token_ids(): waits for N's host copy only now

Step N+1's input ids are step N's sampled ids, which the scheduler has not seen yet: it writes
*future refs* (-1 - entry) instead, and the forward thread swaps them for the ids step N stored
in the device-side `FutureTokenMap`. Nothing on the way to the next launch waits for the device
(no .item() / .tolist()); the host copy of the ids is non_blocking into pinned memory on CUDA and
an event says when it has landed.

Every device operation of the scheduler thread (slot writes into req_to_token, the allocator's
free list) goes to the same stream as the forward thread's, so the device sees them in issue
order; the forward thread runs steps one after another, so a KV slot freed while step N runs can
only be written again by a later step.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from loom.runtime.model_executor.device import to_device
from loom.runtime.model_executor.forward_batch import ForwardBatch
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.model_executor.sampling import SamplingBatchInfo, sample
from loom.runtime.sampling_params import SamplingParams


class FutureTokenMap:
    """A device ring of sampled ids. Each launched step reserves one entry per request; the next
    step names its inputs by those entries (future refs, negative) until the ids exist."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        # Two steps' entries are live at once (the one running, the one resolving from it); 4x
        # leaves room for a ring that restarts at 0 rather than wrapping inside a step.
        self.size = 4 * max_batch + 4
        self.ids = torch.zeros(self.size, dtype=torch.int64, device=device)
        self.next = 0

    def reserve(self, n: int) -> int:
        """Entries [start, start + n) for a step of n requests (scheduler thread) -> start."""
        assert n <= self.size // 2, f"a step of {n} requests outgrows the future map ({self.size})"
        if self.next + n > self.size:
            self.next = 0
        start, self.next = self.next, self.next + n
        return start

    @staticmethod
    def ref(entry: int) -> int:
        return -1 - entry

    def resolve(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Swap future refs for the ids stored at their entries (forward thread). input_ids: [B] on the device."""
        return torch.where(input_ids < 0, self.ids[(-1 - input_ids).clamp_(min=0)], input_ids)

    def store(self, start: int, next_ids: torch.Tensor) -> None:
        self.ids[start : start + next_ids.numel()] = next_ids


@dataclasses.dataclass(slots=True)
class DecodeSampling:
    """What sampling needs of each request, captured on the scheduler thread at launch."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    banned_ids: list[list[int]]


class InflightStep:
    """A launched decode step: its requests (batch order) and, once done, their sampled ids."""

    def __init__(self, reqs: list, future: Future, host_ids: torch.Tensor, event: torch.cuda.Event | None) -> None:
        self.reqs = reqs
        self.future = future
        self.host_ids = host_ids  # [B] int64, pinned on CUDA
        self.event = event

    def token_ids(self) -> list[int]:
        """Wait for the step -> its sampled ids. Raises what the forward thread raised."""
        self.future.result()
        if self.event is not None:
            self.event.synchronize()
        return self.host_ids.tolist()


class OverlapWorker:
    """Runs decode steps (forward + sample) on one thread, in launch order."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.future_map = FutureTokenMap(max_batch, runner.device)
        # The current CUDA device is per thread: the forward thread's events and streams must be
        # those of the model's GPU, which need not be GPU 0.
        init = (lambda: torch.cuda.set_device(self.device)) if self.device.type == "cuda" else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loom-forward", initializer=init)

    def launch(self, reqs: list, fb: ForwardBatch, sampling: DecodeSampling) -> tuple[InflightStep, int]:
        """Queue a decode step; fb.input_ids may hold future refs. -> (the step, the first of its
        future-map entries: request i's sampled id will be `FutureTokenMap.ref(start + i)`)."""
        start = self.future_map.reserve(fb.batch_size)
        cuda = self.device.type == "cuda"
        host_ids = torch.empty(fb.batch_size, dtype=torch.int64, pin_memory=cuda)
        event = torch.cuda.Event() if cuda else None
        future = self.executor.submit(self._run, fb, sampling, start, host_ids, event)
        return InflightStep(reqs, future, host_ids, event), start

    def _run(
        self, fb: ForwardBatch, sampling: DecodeSampling, start: int, host_ids: torch.Tensor, event: torch.cuda.Event | None
    ) -> None:
        with torch.inference_mode():  # thread-local: the scheduler thread's mode does not carry over
            fb.input_ids = self.future_map.resolve(fb.input_ids.to(self.device, non_blocking=True))
            hidden = self.runner.forward(fb)  # [B, H]
            logits = self.runner.compute_logits(hidden)  # [B, V]
            # Built on the host and moved through pinned memory: a copy from pageable memory would
            # wait here for the forward pass to finish before the sampling kernels are queued.
            info = SamplingBatchInfo.from_params(
                sampling.params,
                output_ids=[()] * len(sampling.params),  # no penalties on this path
                vocab_size=logits.shape[-1],
                device="cpu",
                generators=sampling.generators,
                banned_ids=sampling.banned_ids,
            )
            next_ids = sample(logits, _sampling_to(info, logits.device))  # [B]
            self.future_map.store(start, next_ids)
            host_ids.copy_(next_ids, non_blocking=True)
            if event is not None:
                event.record()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


def _sampling_to(info: SamplingBatchInfo, device: torch.device) -> SamplingBatchInfo:
    """The batch's sampling tensors on `device` (pinned, non-blocking copies on CUDA; as is on CPU)."""
    if device.type != "cuda":
        return info
    for f in dataclasses.fields(info):
        value = getattr(info, f.name)
        if isinstance(value, torch.Tensor):
            setattr(info, f.name, to_device(value, device))
        elif isinstance(value, tuple) and all(isinstance(v, torch.Tensor) for v in value):  # banned (rows, ids)
            setattr(info, f.name, tuple(to_device(v, device) for v in value))
    return info


def overlap_supported(params: SamplingParams) -> bool:
    """Sampling that needs no output ids on the host: no frequency / presence / repetition penalty."""
    return params.frequency_penalty == 0 and params.presence_penalty == 0 and params.repetition_penalty == 1

