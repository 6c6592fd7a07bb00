"""Tensor parallelism on the CPU with gloo: two ranks give the tokens one rank gives, and each holds half.

The end-to-end cases run real `loom serve --tp-size 2` processes (marked slow; they still run in
CI): greedy tokens equal `tp_size=1` and Transformers for Llama, Qwen2 (one KV head for two
ranks: replicated) and Qwen3 (tied embeddings, a two-file checkpoint), under chunked prefill,
prefix hits and a KV pool small enough to force eviction and retraction, with a regex grammar and
seeded sampling beside greedy requests; two "nodes" over
loopback; a killed rank fails the server with 503 and a non-zero exit, never a hang.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.cli import build_parser
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.models import loader
from loom.runtime.server_args import ServerArgs

from golden import check_steps, hf_greedy, hf_model, random_prompts, reference_logprobs
from server_proc import Server, alive, child_pids, free_port

NEW_TOKENS = 12
TIGHT = ["--max-total-tokens", "160", "--chunked-prefill-size", "24", "--debug-check-memory"]

# arch -> checkpoint options: every way a rank's shard can be cut.
MODELS: dict[str, dict[str, Any]] = {
    "llama": {"vocab_size": 515},  # a vocabulary that does not split evenly: the last rank holds a padding row
    "qwen2": {"num_key_value_heads": 1},  # fewer KV heads than ranks: each rank holds the one KV head; q/k/v biases
    "qwen3": {"tie_word_embeddings": True, "num_shards": 2},  # q/k norms, the LM head is the embedding, two files
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return {
        arch: build_tiny_checkpoint(tmp_path_factory.mktemp(f"tp-{arch}"), arch, seed=11, **opts)
        for arch, opts in MODELS.items()
    }


# ----------------------------------------------------------------------------- arguments and flags


def test_server_args_validate_the_parallel_layout() -> None:
    args = ServerArgs("m", tp_size=4, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:29500")
    assert args.tp_per_node == 2
    for bad, match in [
        ({"tp_size": 0}, "tp_size must be an int >= 1"),
        ({"tp_size": 3, "nnodes": 2, "dist_init_addr": "h:1"}, "multiple of nnodes=2"),
        ({"tp_size": 2, "nnodes": 2, "node_rank": 2, "dist_init_addr": "h:1"}, r"node_rank must be an int in \[0, nnodes=2\)"),
        ({"tp_size": 2, "nnodes": 2}, "nnodes > 1 needs dist_init_addr"),
        ({"tp_size": 2, "dist_init_addr": "10.0.0.1"}, "dist_init_addr must be HOST:PORT"),
        ({"tp_size": 2, "dist_init_addr": "host:99999"}, "dist_init_addr must be HOST:PORT"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServerArgs("m", **bad)


def test_serve_help_explains_the_parallel_flags() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for flag in ("--tp-size", "--nnodes", "--node-rank", "--dist-init-addr"):
        assert flag in text, f"{flag} missing from `loom serve --help`"
    assert "rendezvous" in text and "tensor-parallel ranks" in text


def test_in_process_engine_says_where_tensor_parallelism_runs(models: dict[str, pathlib.Path]) -> None:
    from loom.runtime.model_executor.model_runner import ModelRunner

    with pytest.raises(ValueError, match="one scheduler process per rank"):
        ModelRunner(ServerArgs(str(models["llama"]), tp_size=2))


# ----------------------------------------------------------------------------- memory per rank


class _CountingSlice:
    """A safetensors slice that counts the bytes the loader reads through it."""

    def __init__(self, inner: Any, counter: list[int]) -> None:
        self.inner, self.counter = inner, counter

    def get_shape(self) -> list[int]:
        return self.inner.get_shape()

    def __getitem__(self, index: Any) -> torch.Tensor:
        t = self.inner[index]
        self.counter[0] += t.numel() * t.element_size()
        return t


def _load_rank(path: pathlib.Path, rank: int, tp: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """-> (parameter bytes the rank holds, checkpoint bytes it read)."""
    read = [0]
    plain = loader.iter_checkpoint
    monkeypatch.setattr(loader, "iter_checkpoint", lambda files: ((n, _CountingSlice(s, read)) for n, s in plain(files)))
    model, _ = loader.load_model(path, torch.float32, tp_rank=rank, tp_size=tp)
    held = sum(p.numel() * p.element_size() for p in model.parameters())  # a tied head is counted once
    return held, read[0]


@pytest.mark.parametrize("arch", list(MODELS))
def test_each_rank_holds_and_reads_about_half_the_weights(
    arch: str, models: dict[str, pathlib.Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    full, full_read = _load_rank(models[arch], 0, 1, monkeypatch)
    for rank in range(2):
        held, read = _load_rank(models[arch], rank, 2, monkeypatch)
        # Half, plus what every rank keeps whole: the norms, a padding row, and the KV head that
        # two ranks share when there are fewer KV heads than ranks.
        assert full / 2 <= held <= full * 0.52, f"{arch} rank {rank} holds {held} of {full} bytes"
        # Read shard by shard from the safetensors slices, never the whole checkpoint.
        assert read <= held and read <= full_read * 0.52, f"{arch} rank {rank} read {read} of {full_read} bytes"
        print(f"{arch} rank {rank}/2: {held} parameter bytes of {full} ({held / full:.3f}), read {read}")


# ----------------------------------------------------------------------------- end to end


def _workload() -> list[list[int]]:
    """Six prompts behind one shared prefix (prefix hits) and one longer than a prefill chunk."""
    prefix = random_prompts(100, 1, 30, 30)[0]
    return random_prompts(101, 6, 4, 16, prefix=prefix) + random_prompts(102, 1, 70, 70)


def _greedy() -> dict[str, Any]:
    return {"temperature": 0, "max_new_tokens": NEW_TOKENS, "ignore_eos": True}


def _serve(path: pathlib.Path, *extra: str) -> Server:
    return Server(path, "--tp-size", "2", "--dtype", "float32", *extra)  # compared with Transformers in fp32


# A grammar (compiled on every rank, its outcome decided by rank 0) and seeded sampling (rank 0's draw).
OTHER_PARAMS = [
    {"regex": "(yes|no)-[0-9]{3}", "temperature": 0, "max_new_tokens": 16},
    {"temperature": 1.0, "top_p": 0.9, "seed": 7, "max_new_tokens": NEW_TOKENS, "ignore_eos": True},
]


def _generate(srv: Server, prompts: list[list[int]], params: Any = None) -> list[dict[str, Any]]:
    r = srv.client.post("/generate", json={"input_ids": prompts, "sampling_params": params or _greedy()})
    assert r.status_code == 200, r.text
    return r.json()


def _tp1(path: pathlib.Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """(greedy tokens of `prompts`, tokens of prompts[0] under OTHER_PARAMS) from one rank."""
    with LocalEngine(
        model_path=str(path), dtype="float32", max_total_tokens=160, chunked_prefill_size=24, debug_check_memory=True
    ) as engine:
        greedy = engine.generate(input_ids=prompts, sampling_params=_greedy())
        other = engine.generate(input_ids=[prompts[0]] * len(OTHER_PARAMS), sampling_params=OTHER_PARAMS)
        return [o["output_ids"] for o in greedy], [o["output_ids"] for o in other]


@pytest.fixture
def server_stopper() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for srv in started:
        srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(MODELS))
def test_tp2_gives_the_tokens_of_tp1_and_transformers(
    arch: str, models: dict[str, pathlib.Path], server_stopper: list[Server]
) -> None:
    path, prompts = models[arch], _workload()
    srv = _serve(path, *TIGHT)
    server_stopper.append(srv)
    want = [hf_greedy(path, p, NEW_TOKENS) for p in prompts]
    tp1_greedy, tp1_other = _tp1(path, prompts)
    assert tp1_greedy == want
    srv.wait_ready()
    first = _generate(srv, prompts)
    assert [o["output_ids"] for o in first] == want
    other = _generate(srv, [prompts[0]] * len(OTHER_PARAMS), OTHER_PARAMS)
    assert [o["output_ids"] for o in other] == tp1_other
    assert re.fullmatch("(yes|no)-[0-9]{3}", other[0]["text"]), other[0]["text"]
    again = _generate(srv, prompts[:3])  # the same prompts once more: served from the radix cache
    assert [o["output_ids"] for o in again] == want[:3]
    assert all(o["meta_info"]["cached_tokens"] > 0 for o in again)
    stats = srv.info()["stats"]
    assert stats["retracted"] > 0, f"the KV pool was meant to be too small for the batch: {stats}"


@pytest.mark.slow
def test_tp2_in_bf16_tracks_transformers_in_bf16(tmp_path: pathlib.Path, server_stopper: list[Server]) -> None:
    """bf16 (what dtype auto runs on a CPU with native bf16) over two ranks: a row-parallel
    layer's two partial sums are rounded to bf16 and then added (the all-reduce), once more than
    Transformers' single GEMM rounds. Teacher-forced within test_bf16_golden's tolerance."""
    path = build_tiny_checkpoint(tmp_path / "bf16", "qwen2", seed=11, dtype="bfloat16", **MODELS["qwen2"])
    srv = Server(path, "--tp-size", "2", "--dtype", "bfloat16")
    server_stopper.append(srv)
    prompts = _workload()
    srv.wait_ready()
    r = srv.client.post("/generate", json={"input_ids": prompts, "sampling_params": _greedy(), "return_logprob": True})
    assert r.status_code == 200, r.text
    hf = hf_model(path, torch.bfloat16)
    decided = steps = 0
    for ids, out in zip(prompts, r.json()):
        tokens = out["output_ids"]
        ref = reference_logprobs(hf, ids + tokens)[len(ids) - 1 : len(ids) - 1 + len(tokens)]
        d, n = check_steps(ref, tokens, [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]], 0.15)
        decided, steps = decided + d, steps + n
    assert steps == NEW_TOKENS * len(prompts) and decided >= 2 * steps / 3, (decided, steps)


def _spawned_children(pid: int) -> list[int]:
    """The multiprocessing children of `pid` (its scheduler ranks; not the resource tracker)."""
    return [c for c in child_pids(pid) if b"spawn_main" in pathlib.Path(f"/proc/{c}/cmdline").read_bytes()]


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["node 0 stops", "node 1's rank dies"])
def test_two_nodes_over_loopback(ending: str, models: dict[str, pathlib.Path], server_stopper: list[Server]) -> None:
    """`--nnodes 2`: node 0 serves HTTP with rank 0, node 1 runs only rank 1; both join one rendezvous.

    Stopping node 0 stops node 1 cleanly; a rank that dies on node 1 fails node 0's server (503)."""
    path, prompts = models["qwen2"], _workload()[:4]
    rendezvous = f"127.0.0.1:{free_port()}"
    common = ["--nnodes", "2", "--dist-init-addr", rendezvous]
    node1 = subprocess.Popen(
        [sys.executable, "-m", "loom", "serve", "--model", str(path), "--tp-size", "2", "--dtype", "float32", *common,
         "--node-rank", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        srv = _serve(path, *common)
        server_stopper.append(srv)
        srv.wait_ready()
        assert "scheduler rank 1" not in srv.info()["pids"], "node 0 must start only its own rank"
        assert [o["output_ids"] for o in _generate(srv, prompts)] == [hf_greedy(path, p, NEW_TOKENS) for p in prompts]
        if ending == "node 0 stops":
            srv.stop()  # rank 0 tells node 1's rank to stop, and node 1 exits cleanly
            assert srv.proc.returncode == 0
            assert node1.wait(60) == 0, node1.stdout.read()
            return
        (rank1,) = _spawned_children(node1.pid)
        os.kill(rank1, signal.SIGKILL)
        assert srv.proc.wait(60) != 0  # rank 0's next broadcast finds its peer gone; the front exits
        out = srv.proc.stdout.read()
        assert "lost its peers" in out and "scheduler rank 0 process died" in out, out
        assert node1.wait(60) == 1
        assert "scheduler rank 1 process died" in node1.stdout.read()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


@pytest.mark.slow
def test_a_killed_rank_fails_the_server_with_503(models: dict[str, pathlib.Path], server_stopper: list[Server]) -> None:
    srv = _serve(models["llama"])
    server_stopper.append(srv)
    srv.wait_ready()
    info = srv.info()
    ranks = [info["pids"]["scheduler rank 0"], info["pids"]["scheduler rank 1"]]
    answer: dict[str, Any] = {}

    def long_request() -> None:
        body = {"text": "x", "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
        try:
            answer["r"] = httpx.post(srv.url + "/generate", json=body, timeout=60)
        except httpx.HTTPError as exc:  # reported below
            answer["exc"] = exc

    t = threading.Thread(target=long_request)
    t.start()
    while srv.info()["num_running_reqs"] == 0:  # the request is decoding on both ranks
        threading.Event().wait(0.05)
    os.kill(ranks[1], signal.SIGKILL)
    t.join(60)
    assert answer.get("r") is not None, answer
    assert answer["r"].status_code == 503 and "scheduler rank" in answer["r"].json()["error"]["message"]
    assert srv.proc.wait(60) != 0
    pids = child_pids(srv.proc.pid) | set(ranks)
    for pid in pids:  # the surviving rank does not hang in a collective: it is gone too
        for _ in range(600):
            if not alive(pid):
                break
            threading.Event().wait(0.1)
        assert not alive(pid), f"process {pid} outlived the server"
