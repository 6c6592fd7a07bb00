"""The scheduler process trims the C heap every few seconds of work (runtime/scheduler/heap.py)."""

from __future__ import annotations

import pytest

from loom.runtime.scheduler import heap


def test_trims_once_work_ran_and_the_interval_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    clock = [100.0]
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1))
    monkeypatch.setattr(heap.time, "monotonic", lambda: clock[0])
    trimmer = heap.HeapTrimmer(interval_s=5.0)
    trimmer.after_step(True)
    assert calls == []  # too soon
    clock[0] += 5.0
    trimmer.after_step(False)  # idle now, but work ran since the last trim
    assert calls == [1]
    clock[0] += 60.0
    trimmer.after_step(False)
    assert calls == [1]  # nothing ran since: no trim while idle
    trimmer.after_step(True)
    assert calls == [1, 1]


def test_release_free_heap_runs() -> None:
    heap.release_free_heap()  # glibc's malloc_trim where there is one; never raises
