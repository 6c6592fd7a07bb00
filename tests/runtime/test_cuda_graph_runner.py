"""Decode through the CUDA-graph runner's fixed, padded buffers gives what the plain path gives.

Without a GPU the graphs are `EagerGraph` stand-ins (replay re-runs the captured callable over
the fixed tensors) and the Triton kernels run under Triton's interpreter: what is checked is the
padding (a batch of 3 replays the graph of 4, one of 5 the graph of 8), the copies into the fixed
tensors, the backend's capture/replay metadata, and that padding rows never write a real KV slot.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator

import pytest
import torch

from loom.runtime.model_executor.cuda_graph_runner import CudaGraphRunner, EagerGraph, capture_batch_sizes
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from loom.runtime.model_executor.model_runner import ModelRunner
from loom.runtime.server_args import ServerArgs

# The stand-in tests run where the Triton kernels do: on a GPU when there is one, else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRAPH_SIZES = [4, 8]  # enough for 3 -> 4 and 5 -> 8; each capture costs a forward under the interpreter


def test_capture_batch_sizes() -> None:
    assert capture_batch_sizes(160) == [1, 2, 4, 8, *range(16, 161, 8)]
    assert capture_batch_sizes(100)[-3:] == [88, 96, 100]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(1) == [1]


def test_cuda_graph_server_args() -> None:
    assert ServerArgs(model_path="m").disable_cuda_graph is False
    assert ServerArgs(model_path="m", cuda_graph_max_bs=32).cuda_graph_max_bs == 32
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="cuda_graph_max_bs must be an int >= 1 or None"):
            ServerArgs(model_path="m", cuda_graph_max_bs=bad)


@pytest.fixture
def triton_interpreted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The Triton kernels on the CPU: conftest.py built them under the interpreter; switch it on again."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    import loom.kernels.triton as kt

    if not torch.cuda.is_available():
        assert kt.INTERPRETED, "triton was imported before TRITON_INTERPRET=1 could be set (see conftest.py)"
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return make_tiny_model("llama", num_hidden_layers=1)


def make_runner(path, backend: str, device: str = DEVICE, dtype: str = "float32", graphs: bool = False) -> ModelRunner:
    args = ServerArgs(
        model_path=str(path), device=device, dtype=dtype, attention_backend=backend, max_total_tokens=256,
        max_running_requests=8, context_length=64, disable_cuda_graph=not graphs,
    )  # fmt: skip
    runner = ModelRunner(args)
    assert (runner.cuda_graph_runner is not None) == graphs  # on the CPU, tests plug in a stand-in
    return runner


def kv_snapshot(runner: ModelRunner) -> torch.Tensor:
    pool = runner.token_to_kv_pool
    return torch.stack([torch.stack([k, v]) for k, v in zip(pool.k_buffer, pool.v_buffer)])  # [L, 2, slots, Hkv, D]


def changed_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return set((before != after).flatten(3).any(-1).any(0).any(0).nonzero().flatten().tolist())


def greedy(runner: ModelRunner, prompts: list[list[int]], steps: int, graph_sizes: list[int] | None) -> tuple:
    """Prefill `prompts` as one extend batch, then `steps` decode steps -> (tokens per step [steps + 1][B],
    KV pool after, slots written by decode steps outside their own out_cache_loc)."""
    b, lens = len(prompts), [len(p) for p in prompts]
    rows = runner.req_to_token_pool.alloc(b)
    req_to_token = runner.req_to_token_pool.req_to_token
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    start = 0
    for row, n in zip(rows, lens):
        req_to_token[row, :n] = slots[start : start + n]
        start += n
    fb = ForwardBatch(
        mode=ForwardMode.EXTEND, batch_size=b, input_ids=torch.tensor(sum(prompts, [])),
        positions=torch.cat([torch.arange(n) for n in lens]), out_cache_loc=slots, req_pool_indices=torch.tensor(rows),
        seq_lens=torch.tensor(lens), seq_lens_cpu=lens, extend_prefix_lens_cpu=[0] * b, extend_seq_lens_cpu=lens,
    )  # fmt: skip
    last = torch.tensor(lens).cumsum(0) - 1
    tokens = runner.compute_logits(runner.forward(fb)[last]).argmax(-1)
    if graph_sizes is not None:
        before = kv_snapshot(runner)
        runner.cuda_graph_runner = CudaGraphRunner(runner, graph_sizes, graph_factory=EagerGraph)
        assert changed_slots(before, kv_snapshot(runner)) <= {0}, "capturing wrote a real KV slot"
    out, stray = [tokens.tolist()], set()
    for _ in range(steps):
        loc = runner.token_to_kv_pool_allocator.alloc(b)
        req_to_token[torch.tensor(rows), torch.tensor(lens)] = loc
        seq_lens = [n + 1 for n in lens]
        fb = ForwardBatch(
            mode=ForwardMode.DECODE, batch_size=b, input_ids=tokens, positions=torch.tensor(lens), out_cache_loc=loc,
            req_pool_indices=torch.tensor(rows), seq_lens=torch.tensor(seq_lens), seq_lens_cpu=seq_lens,
        )  # fmt: skip
        before = kv_snapshot(runner)
        hidden = runner.forward(fb)
        assert hidden.shape[0] == b
        stray |= changed_slots(before, kv_snapshot(runner)) - set(loc.tolist())
        tokens = runner.compute_logits(hidden).argmax(-1)
        out.append(tokens.tolist())
        lens = seq_lens
    return out, kv_snapshot(runner), stray


@pytest.mark.parametrize("batch, padded", [(3, 4), (5, 8)])
def test_padded_graph_replay_matches_plain_decode(model_dir, triton_interpreted, batch: int, padded: int) -> None:
    prompts = [[(7 * i + 3 * j) % 400 + 10 for j in range(4 + 2 * i)] for i in range(batch)]  # 4..12 tokens
    plain = make_runner(model_dir, "triton")
    graphed = make_runner(model_dir, "triton")
    graphed.attn_backend.graph_num_kv_splits = 3  # several splits, some empty: short sequences
    want_tokens, want_kv, stray = greedy(plain, prompts, steps=2, graph_sizes=None)
    assert stray == set()
    got_tokens, got_kv, stray = greedy(graphed, prompts, steps=2, graph_sizes=GRAPH_SIZES)
    graph_runner = graphed.cuda_graph_runner
    assert graph_runner.padded_size(batch) == padded
    assert graph_runner.input_ids[:batch].tolist() == got_tokens[-2], "the last step went through the fixed tensors"
    assert got_tokens == want_tokens
    assert stray <= {0}, "a padding row wrote a real KV slot"
    # Every real slot holds what the plain path stored there (slot 0 is the padding rows' scratch).
    torch.testing.assert_close(got_kv[:, :, 1:], want_kv[:, :, 1:], atol=1e-4, rtol=1e-4)
    assert not graph_runner.can_run(ForwardBatch(ForwardMode.DECODE, 9, *[torch.zeros(9, dtype=torch.int64)] * 5, [1] * 9))


def test_larger_graph_then_smaller_batch_resets_padding(model_dir, triton_interpreted) -> None:
    """Rows left in the fixed tensors by a batch of 5 must not leak into a later batch of 3 (graph of 4)."""
    runner = make_runner(model_dir, "triton")
    prompts = [[11 + i, 12 + i, 13 + i] for i in range(5)]
    greedy(runner, prompts, steps=1, graph_sizes=GRAPH_SIZES)
    graph_runner = runner.cuda_graph_runner
    assert graph_runner.input_ids[:5].ne(0).any()
    fb = ForwardBatch(
        mode=ForwardMode.DECODE, batch_size=3, input_ids=torch.tensor([5, 6, 7]), positions=torch.tensor([3, 3, 3]),
        out_cache_loc=torch.tensor([200, 201, 202]), req_pool_indices=torch.tensor([0, 1, 2]),
        seq_lens=torch.tensor([4, 4, 4]), seq_lens_cpu=[4, 4, 4],
    )  # fmt: skip
    runner.forward(fb)
    assert graph_runner.input_ids[3].item() == 0 and graph_runner.out_cache_loc[3].item() == 0
    assert graph_runner.req_pool_indices[3].item() == 0 and graph_runner.seq_lens[3].item() == 1


def test_triton_graph_kv_splits_fill_the_gpu(triton_interpreted, monkeypatch) -> None:
    from loom.kernels.attention import triton_backend
    from loom.kernels.attention.base import AttentionLayer

    monkeypatch.setattr(triton_backend, "CPU_SM_COUNT", 132)  # an H100/H200's count (used off CUDA only)
    backend = triton_backend.TritonAttnBackend("cpu")
    backend.bind_model(AttentionLayer(0, 32, 8, 64, 0.125), torch.float16, torch.float16)
    assert [backend.graph_kv_splits(bs) for bs in (1, 2, 4, 8, 16, 32, 160)] == [8, 8, 8, 4, 2, 1, 1]
    backend.graph_num_kv_splits = 3  # a fixed count overrides the rule
    assert backend.graph_kv_splits(160) == 3


def test_torch_native_is_not_captured(model_dir) -> None:
    """torch_native builds its decode metadata with Python over the requests and host syncs: no graphs."""
    runner = make_runner(model_dir, "torch_native")
    assert not runner.attn_backend.supports_cuda_graph
    with pytest.raises(AssertionError, match="does not support CUDA graphs"):
        CudaGraphRunner(runner, GRAPH_SIZES, graph_factory=EagerGraph)


def test_engine_decodes_the_same_through_graphs(model_dir, triton_interpreted, monkeypatch) -> None:
    """The whole engine (scheduler, sampling, radix cache) with decode graphs on gives the same greedy
    tokens: a batch of 3 decodes through the graph of 4, then 2 (one finished early) through the graph of 2."""
    from loom.runtime.entrypoints.engine import LocalEngine
    from loom.runtime.model_executor import model_runner as mr_module

    prompts = [[10, 11, 12, 13, 14], [20, 21, 22], [30, 31, 32, 33, 34, 35, 36]]
    params = [{"temperature": 0, "max_new_tokens": n, "ignore_eos": True} for n in (4, 2, 4)]
    results, replays = {}, []
    replay = CudaGraphRunner.replay

    def counted_replay(self, fb):
        replays.append((fb.batch_size, self.padded_size(fb.batch_size)))
        return replay(self, fb)

    for graphs in (False, True):
        if graphs:
            monkeypatch.setattr(mr_module.ModelRunner, "_use_cuda_graph", lambda self: True)
            monkeypatch.setattr(CudaGraphRunner, "replay", counted_replay)
            monkeypatch.setattr(mr_module, "CudaGraphRunner", functools.partial(CudaGraphRunner, graph_factory=EagerGraph))
        with LocalEngine(model_path=str(model_dir), attention_backend="triton", dtype="float32", device=DEVICE,
                         max_total_tokens=256, max_running_requests=4, context_length=64,
                         debug_check_memory=True) as engine:  # fmt: skip
            assert (engine.model_runner.cuda_graph_runner is not None) == graphs
            results[graphs] = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=params)]
            if graphs:
                assert engine.model_runner.cuda_graph_runner.batch_sizes == [1, 2, 4]
    assert results[True] == results[False]
    assert [len(t) for t in results[True]] == [4, 2, 4]
    assert (3, 4) in replays and (2, 2) in replays, replays


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "flashinfer"])
def test_real_cuda_graphs_match_eager_decode(make_tiny_model, backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    # head_dim 64: a size FlashInfer ships kernels for
    path = make_tiny_model("llama", num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    for batch, padded in [(3, 4), (5, 8)]:
        prompts = [[(7 * i + 3 * j) % 400 + 10 for j in range(4 + 9 * i)] for i in range(batch)]
        eager = make_runner(path, backend, device="cuda", dtype="float16")
        graphed = make_runner(path, backend, device="cuda", dtype="float16", graphs=True)
        assert graphed.cuda_graph_runner.batch_sizes == [1, 2, 4, 8]
        assert graphed.cuda_graph_runner.padded_size(batch) == padded
        want_tokens, want_kv, _ = greedy(eager, prompts, steps=4, graph_sizes=None)
        got_tokens, got_kv, stray = greedy(graphed, prompts, steps=4, graph_sizes=None)
        assert got_tokens == want_tokens
        assert stray <= {0}, "a padding row wrote a real KV slot"
        torch.testing.assert_close(got_kv[:, :, 1:], want_kv[:, :, 1:], atol=2e-2, rtol=2e-2)
