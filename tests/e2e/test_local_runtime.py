"""`loom.Runtime`: a program starts the engine's processes and runs over their ZeroMQ front door
(no HTTP), then stops them all."""

from __future__ import annotations

import pathlib
import time

import pytest

import loom as sgl
from loom.checkpoint_writer import build_tiny_checkpoint


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("rt"), arch="qwen2", vocab_size=512, seed=9)


@sgl.function
def triage(s, ticket):
    s += sgl.system("You sort support tickets.")
    s += sgl.user(f"Ticket: {ticket}\nHow urgent is it?")
    s += sgl.assistant(sgl.select("urgency", choices=["low", "medium", "high"]))
    forks = s.fork(2)
    for i, f in enumerate(forks):
        f += f"\nIdea {i}: " + sgl.gen("idea", max_tokens=6, temperature=0)
    forks.join()
    s += "\nCode: " + sgl.gen("code", max_tokens=8, regex=r"[A-Z]{3}-[0-9]{2}")


def test_a_program_runs_on_the_runtime_and_shutdown_stops_everything(model_dir):
    with sgl.Runtime(model_path=str(model_dir), max_total_tokens=2048) as rt:
        assert rt.model_info["model_path"] == str(model_dir)
        state = triage.run(ticket="The login page is down", backend=rt)
        assert state.error() is None
        assert state["urgency"] in ("low", "medium", "high")
        assert len(state["code"]) == 6 and state["code"][3] == "-"
        # The last gen's prompt starts with what the select and the fork already ran: cached.
        assert state.get_meta_info("code")["cached_tokens"] > 0
        states = triage.run_batch([{"ticket": f"ticket {i}"} for i in range(3)], backend=rt)
        assert all(s.error() is None for s in states)
        server = rt.server
        pid, folder = server.proc.pid, pathlib.Path(server.address.removeprefix("ipc://")).parent
    assert server.proc.returncode == 0 and not folder.exists()
    deadline = time.monotonic() + 10
    while pathlib.Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, "the runtime's server outlived shutdown()"
        time.sleep(0.1)


def test_unknown_engine_arguments_are_named_before_anything_starts(model_dir):
    with pytest.raises(sgl.EngineArgumentError, match="max_total_tokenz"):
        sgl.Runtime(model_path=str(model_dir), max_total_tokenz=5)


@pytest.mark.parametrize("entry", ["Engine", "LocalEngine", "Runtime"])
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [({"max_total_tokenz": 5}, "max_total_tokenz"), ({"schedule_policy": "fifo"}, "schedule_policy"),
     ({"grammar_backend": "lark"}, "grammar_backend")],
)  # fmt: skip
def test_one_mistake_one_error_type_whichever_entry_point(model_dir, monkeypatch, entry, kwargs, needle):
    import subprocess

    def no_process(*args, **kw):
        raise AssertionError("a process was started for a wrong argument")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    with pytest.raises(sgl.EngineArgumentError, match=needle) as err:
        getattr(sgl, entry)(model_path=str(model_dir), **kwargs)
    assert isinstance(err.value, TypeError) and isinstance(err.value, ValueError)
