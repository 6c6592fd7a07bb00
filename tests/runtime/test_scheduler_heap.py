"""The scheduler process trims the C heap every few seconds of work (runtime/scheduler/heap.py)."""

from __future__ import annotations

import platform

import pytest

from loom.runtime.scheduler import heap


def test_trims_while_busy_every_interval_and_once_on_going_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    clock = [100.0]
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1))
    monkeypatch.setattr(heap.time, "monotonic", lambda: clock[0])
    trimmer = heap.HeapTrimmer(interval_s=5.0, idle_interval_s=0.5)
    trimmer.after_step(True)
    trimmer.after_step(False)
    assert calls == []  # idle at once, but too soon after the last trim
    clock[0] += 1.0
    trimmer.after_step(False)
    assert calls == [1]  # idle after work: trimmed
    clock[0] += 60.0
    trimmer.after_step(False)
    assert calls == [1]  # nothing ran since: no trim while idle
    for _ in range(5):  # work from t to t + 4 s: no trim yet
        clock[0] += 1.0
        trimmer.after_step(True)
    assert calls == [1]
    clock[0] += 1.0
    trimmer.after_step(True)
    assert calls == [1, 1]  # 5 s of work: trimmed


def test_release_free_heap_finds_glibcs_trim() -> None:
    """Where the C library is glibc the trim is found (else the scheduler's memory silently stays at
    its high-water mark); elsewhere it is a no-op that never raises."""
    if platform.libc_ver()[0] == "glibc":
        assert heap._malloc_trim() is not None
    heap.release_free_heap()
