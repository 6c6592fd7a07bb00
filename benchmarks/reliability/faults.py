"""The fault cases, each on a server of its own with requests in flight (half streamed, half not):

- kill -9 of the scheduler, and of the detokenizer: every request in flight gets a final answer
  (503, or an error event in its stream) within seconds, and the server exits 1;
- kill -9 of the front: nobody is left to answer (clients see their connections cut), but its
  children notice and exit, and the socket folder goes, within 10 s;
- SIGTERM: the server stops admitting, gives what runs a grace period, answers what is left with
  503 JSON, and exits 0; the log holds no traceback.

Each case then checks that no process the server started is left after 10 s.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

from reliability.client import Outcome, send
from reliability.server import LoomServer, kill_all, wait_gone

LEFT_BEHIND_LIMIT_S = 10.0
CASES = ("kill-scheduler", "kill-detokenizer", "kill-front", "sigterm")


@dataclass
class FaultResult:
    name: str
    in_flight: int
    answers: Counter = field(default_factory=Counter)  # "503", "200", "stream error", "cut", ...
    lost: int = 0  # requests with no final answer whose connection was not cut either
    first_answer_s: float | None = None  # after the fault
    last_answer_s: float | None = None
    exit_code: int | None = None
    gone_after_s: float = 0.0  # from the fault until no process and no socket folder was left
    left: list[str] = field(default_factory=list)
    tracebacks: int = 0  # "Traceback" lines in the server's log


def _label(o: Outcome) -> str:
    if not o.finals:
        return "cut" if o.error else "no final answer"
    if o.status != 200:
        return str(o.status)
    return "stream error event" if o.stream_error else "200"


async def run_fault(case: str, model: str, flags: list[str], in_flight: int = 8, max_new_tokens: int = 2000) -> FaultResult:
    """Start a server, put `in_flight` long requests on it, inflict `case`, and see what follows."""
    assert case in CASES, case
    srv = LoomServer(model, flags)
    await asyncio.to_thread(srv.start)
    result = FaultResult(case, in_flight)
    family: set[int] = set()
    try:
        info = await asyncio.to_thread(srv.info)
        pids, ipc_dir = info["pids"], info["ipc_dir"]
        family = srv.descendants()
        async with srv.client(timeout=120) as client:
            tasks = []
            for i in range(in_flight):
                stream = i % 2 == 0
                body = {"text": f"Story number {i}:", "stream": stream,
                        "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}  # fmt: skip
                tasks.append(asyncio.create_task(send(client, "/generate", body, stream, timeout=120)))
            await _until_running(srv, in_flight)
            t0 = time.perf_counter()
            _inflict(case, srv, pids)
            outcomes = await asyncio.gather(*tasks)
        for o in outcomes:
            result.answers[_label(o)] += 1
            result.lost += int(o.lost and case != "kill-front")  # a dead front answers nobody: that is the case
        answered = [o.ended - t0 for o in outcomes if o.finals]
        if answered:
            result.first_answer_s, result.last_answer_s = min(answered), max(answered)
        result.exit_code = await asyncio.to_thread(srv.wait_exit, 60)
        since_fault = time.perf_counter() - t0
        waited, result.left = await asyncio.to_thread(wait_gone, family, [ipc_dir], LEFT_BEHIND_LIMIT_S - since_fault)
        result.gone_after_s = since_fault + waited
    finally:
        srv.stop()
        kill_all(family)  # whatever outlived the case (reported in `left`), so the next case starts clean
        result.tracebacks = pathlib.Path(srv.log.name).read_text(errors="replace").count("Traceback")
    return result


async def _until_running(srv: LoomServer, n: int, timeout: float = 120.0) -> None:
    """Wait until `n` requests decode (so that the fault lands on work in progress)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await asyncio.to_thread(srv.info)
        if info["num_running_reqs"] >= n:
            return
        await asyncio.sleep(0.1)


def _inflict(case: str, srv: LoomServer, pids: dict[str, int]) -> None:
    assert srv.proc is not None
    if case == "kill-scheduler":
        os.kill(pids["scheduler"], signal.SIGKILL)
    elif case == "kill-detokenizer":
        os.kill(pids["detokenizer"], signal.SIGKILL)
    elif case == "kill-front":
        srv.proc.send_signal(signal.SIGKILL)
    else:
        srv.proc.send_signal(signal.SIGTERM)
