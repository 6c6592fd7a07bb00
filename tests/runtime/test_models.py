"""Native Llama-family models against Transformers on the same tiny checkpoints.

Logits of prefill (ragged batches), extend-with-cached-prefix and batched decode must equal
Hugging Face's full forward; greedy continuations must equal `generate(do_sample=False)`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import TYPE_CHECKING, Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from loom.kernels.attention import TorchNativeAttnBackend, create_attention_backend
from loom.radix_cache import ReqToTokenPool, TokenToKVPool
from loom.runtime.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from loom.runtime.layers.linear import PACKED_MIN_ROWS, linear, pack_cpu_weights, skinny_linear
from loom.runtime.layers.rotary import rope_inv_freq, rope_parameters
from loom.runtime.model_executor.forward_batch import ForwardBatch, ForwardMode
from loom.runtime.models import get_model_class
from loom.runtime.models.loader import checkpoint_dtype, load_model

if TYPE_CHECKING:
    from conftest import MakeTinyModel

Case = tuple[pathlib.Path, torch.nn.Module, torch.nn.Module, Any]  # (checkpoint, HF model, loom model, config)
ATOL = 1e-4
VOCAB = 512
# name -> build_tiny_checkpoint arguments; qwen3-hd32 has head_dim != hidden / heads, as real Qwen3 models do.
CASES: dict[str, dict[str, Any]] = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tie_word_embeddings=True),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "qwen3-hd32": dict(arch="qwen3", head_dim=32, tie_word_embeddings=True),
    "mistral": dict(arch="mistral"),
}


class Harness:
    """Drives a loom model the way the scheduler does: pools, slot allocation, ForwardBatch."""

    def __init__(
        self, model: torch.nn.Module, config: Any, dtype: torch.dtype = torch.float32, slots: int = 2048, tp_size: int = 1
    ) -> None:
        self.model, self.dtype = model, dtype
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = max(config.num_key_value_heads // tp_size, 1)
        self.kv_pool = TokenToKVPool(slots, dtype, kv_heads, head_dim, config.num_hidden_layers, "cpu")
        self.req_pool = ReqToTokenPool(8, 512, "cpu")
        self.backend = create_attention_backend("torch_native", "cpu")
        self.next_slot = 1  # slot 0 is reserved
        self.lens: dict[int, int] = {}

    def _alloc(self, n: int) -> torch.Tensor:
        slots = torch.arange(self.next_slot, self.next_slot + n)
        self.next_slot += n
        return slots

    @torch.inference_mode()
    def run(self, rows: list[int], tokens: list[list[int]], decode: bool = False) -> list[torch.Tensor]:
        """Feed `tokens[i]` to request row `rows[i]` after what it already has -> per-request logits [n_i, V]."""
        ids, positions, locs, prefix_lens, new_lens = [], [], [], [], []
        for row, toks in zip(rows, tokens):
            prefix = self.lens.get(row, 0)
            slots = self._alloc(len(toks))
            self.req_pool.req_to_token[row, prefix : prefix + len(toks)] = slots
            ids += toks
            positions += range(prefix, prefix + len(toks))
            locs.append(slots)
            prefix_lens.append(prefix)
            new_lens.append(len(toks))
            self.lens[row] = prefix + len(toks)
        seq_lens = [p + n for p, n in zip(prefix_lens, new_lens)]
        fb = ForwardBatch(
            mode=ForwardMode.DECODE if decode else ForwardMode.EXTEND,
            batch_size=len(rows),
            input_ids=torch.tensor(ids),
            positions=torch.tensor(positions),
            out_cache_loc=torch.cat(locs),
            req_pool_indices=torch.tensor(rows),
            seq_lens=torch.tensor(seq_lens),
            seq_lens_cpu=seq_lens,
            extend_prefix_lens_cpu=[] if decode else prefix_lens,
            extend_seq_lens_cpu=[] if decode else new_lens,
            req_to_token_pool=self.req_pool,
            token_to_kv_pool=self.kv_pool,
            attn_backend=self.backend,
        )
        self.backend.init_forward_metadata(fb)
        hidden = self.model(fb.input_ids, fb.positions, fb)
        assert hidden.shape == (len(ids), self.model.config.hidden_size)
        logits = self.model.compute_logits(hidden)
        assert logits.dtype == torch.float32
        return list(logits.split(new_lens))


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, make_tiny_model: MakeTinyModel) -> Case:
    """(checkpoint dir, HF model, loom model, config) for each architecture. The model's weights
    are packed for oneDNN as the engine packs them on the CPU: batches of PACKED_MIN_ROWS rows and
    more go through oneDNN, smaller ones through the plain weights."""
    path = make_tiny_model(**CASES[request.param])
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model, config = load_model(path, torch.float32)
    assert pack_cpu_weights(model) > 0
    return path, hf, model, config


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


def random_ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_prefill_ragged_batch_matches_hf(case: Case) -> None:
    _, hf, model, config = case
    prompts = [random_ids(n, seed) for seed, n in enumerate([7, 19, 1, 12])]
    out = Harness(model, config).run([0, 1, 2, 3], prompts)
    for ids, logits in zip(prompts, out):
        torch.testing.assert_close(logits, hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_extend_reads_cached_prefix(case: Case) -> None:
    _, hf, model, config = case
    seqs = [random_ids(n, 10 + i) for i, n in enumerate([16, 9, 13])]
    h = Harness(model, config)
    h.run([0, 1], [seqs[0][:7], seqs[1][:1]])  # the first parts; request 2 has no prefix
    out = h.run([0, 1, 2], [seqs[0][7:], seqs[1][1:], seqs[2]])
    torch.testing.assert_close(out[0], hf_logits(hf, seqs[0])[7:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], hf_logits(hf, seqs[1])[1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2], hf_logits(hf, seqs[2]), atol=ATOL, rtol=0)


def test_batched_decode_matches_hf(case: Case) -> None:
    _, hf, model, config = case
    lens, steps = [3, 11, 6], 4
    seqs = [random_ids(n + steps, 20 + i) for i, n in enumerate(lens)]
    h = Harness(model, config)
    h.run([0, 1, 2], [s[:n] for s, n in zip(seqs, lens)])
    full = [hf_logits(hf, s) for s in seqs]
    for step in range(steps):
        rows = [0, 1, 2] if step % 2 == 0 else [2, 0]  # the batch composition changes between steps
        if step % 2:
            single = h.run([1], [[seqs[1][lens[1] + step]]], decode=True)[0]  # a batch of one
            torch.testing.assert_close(single[0], full[1][lens[1] + step], atol=ATOL, rtol=0)
        out = h.run(rows, [[seqs[r][lens[r] + step]] for r in rows], decode=True)
        for r, logits in zip(rows, out):
            torch.testing.assert_close(logits[0], full[r][lens[r] + step], atol=ATOL, rtol=0)


def test_greedy_continuation_matches_generate(case: Case) -> None:
    _, hf, model, config = case
    prompts = [random_ids(5, 30), random_ids(9, 31)]
    h = Harness(model, config)
    logits = h.run([0, 1], prompts)
    tokens = [[int(lg[-1].argmax())] for lg in logits]
    for _ in range(19):
        out = h.run([0, 1], [t[-1:] for t in tokens], decode=True)
        for t, lg in zip(tokens, out):
            t.append(int(lg[0].argmax()))
    for prompt, ours in zip(prompts, tokens):
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False)[0, len(prompt) :].tolist()
        assert ref, "generate produced nothing"
        assert ours[: len(ref)] == ref  # generate stops early at eos; up to there the tokens agree


# ----------------------------------------------------------------------------- loading


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def test_sharded_checkpoint_loads_identically(make_tiny_model: MakeTinyModel) -> None:
    single, _ = load_model(make_tiny_model("qwen2"), torch.float32)
    sharded_dir = make_tiny_model("qwen2", num_shards=3)
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    sharded, _ = load_model(sharded_dir, torch.float32)
    a, b = params_of(single), params_of(sharded)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_packed_weights_hold_the_checkpoint_tensors(make_tiny_model: MakeTinyModel) -> None:
    path = make_tiny_model("qwen2")
    model, _ = load_model(path, torch.float32)
    saved = load_file(path / "model.safetensors")
    attn = model.model.layers[1].self_attn
    qkv = torch.cat([saved[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(attn.qkv_proj.weight, qkv)
    assert torch.equal(attn.qkv_proj.bias, torch.cat([saved[f"model.layers.1.self_attn.{p}_proj.bias"] for p in "qkv"]))
    gate_up = torch.cat([saved[f"model.layers.1.mlp.{p}_proj.weight"] for p in ("gate", "up")])
    assert torch.equal(model.model.layers[1].mlp.gate_up_proj.weight, gate_up)


def test_tied_embeddings_share_one_tensor(make_tiny_model: MakeTinyModel) -> None:
    path = make_tiny_model("llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model, _ = load_model(path, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def copy_checkpoint(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_weight_is_named(make_tiny_model: MakeTinyModel, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(make_tiny_model("llama"), tmp_path / "ckpt")
    state = load_file(path / "model.safetensors")
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing weights.*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(path, torch.float32)


def test_missing_files_are_named(make_tiny_model: MakeTinyModel, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(make_tiny_model("llama", num_shards=2), tmp_path / "ckpt")
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(path, torch.float32)
    for f in path.glob("model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(path, torch.float32)
    with pytest.raises(FileNotFoundError, match="neither a local folder"):
        load_model(tmp_path / "nowhere", torch.float32)


def test_unsupported_configs_fail_clearly(make_tiny_model: MakeTinyModel) -> None:
    config = AutoConfig.from_pretrained(make_tiny_model("mistral"))
    assert checkpoint_dtype(config) == torch.float32
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM, MistralForCausalLM"):
        get_model_class(config)
    config.architectures = ["MistralForCausalLM"]
    config.sliding_window = 16
    with pytest.raises(NotImplementedError, match="sliding_window=16"):
        get_model_class(config)(config)
    config.sliding_window = config.max_position_embeddings  # a window covering the whole context is full attention
    get_model_class(config)(config)


def test_bfloat16_loads_and_runs(make_tiny_model: MakeTinyModel) -> None:
    path = make_tiny_model("qwen3")
    model, config = load_model(path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [random_ids(n, 40 + n) for n in (6, 14)]
    h = Harness(model, config, dtype=torch.bfloat16)
    out = h.run([0, 1], prompts)
    out2 = h.run([0, 1], [[5], [6]], decode=True)
    for ids, logits, nxt, step in zip(prompts, out, (5, 6), out2):
        ref = hf_logits(hf, ids + [nxt])
        scale = ref.abs().max()
        torch.testing.assert_close(logits, ref[:-1], atol=0.05 * scale, rtol=0)
        torch.testing.assert_close(step[0], ref[-1], atol=0.05 * scale, rtol=0)
        agree = (logits.argmax(-1) == ref[:-1].argmax(-1)).float().mean()
        assert agree >= 0.8, f"bf16 argmax agrees with fp32 at only {agree:.0%} of positions"


# ----------------------------------------------------------------------------- rope scaling


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 256},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    ],  # fmt: skip
)
def test_rope_frequencies_match_transformers(scaling: dict[str, Any]) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(head_dim=32, hidden_size=128, num_attention_heads=4, max_position_embeddings=2048,
                         rope_parameters={**scaling, "rope_theta": 50000.0})  # fmt: skip
    ours, our_scale = rope_inv_freq(32, rope_parameters(config), config.max_position_embeddings)
    ref, ref_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config, "cpu")
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)
    assert our_scale == pytest.approx(ref_scale)


def test_llama3_rope_model_matches_hf(make_tiny_model: MakeTinyModel, tmp_path: pathlib.Path) -> None:
    path = copy_checkpoint(make_tiny_model("llama"), tmp_path / "llama3")
    raw = json.loads((path / "config.json").read_text())
    raw["rope_parameters"] = raw["rope_scaling"] = {
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(raw))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert hf.config.rope_parameters["rope_type"] == "llama3"
    model, config = load_model(path, torch.float32)
    ids = random_ids(40, 50)
    h = Harness(model, config)
    out = h.run([0], [ids[:30]])[0]
    step = h.run([0], [[ids[30]]], decode=True)[0]
    ref = hf_logits(hf, ids[:31])
    torch.testing.assert_close(torch.cat([out, step]), ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- tensor-parallel shards


def test_tensor_parallel_shards_reassemble_the_full_layer() -> None:
    """Each rank's weight_loader keeps its slice; the ranks' partial results add up to the full layer."""
    gen = torch.Generator().manual_seed(0)
    hidden, d, heads, kv_heads, inter, tp = 16, 4, 4, 2, 24, 2
    full = {p: torch.randn(n * d, hidden, generator=gen) for p, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    gate, up = torch.randn(2, inter, hidden, generator=gen)
    down = torch.randn(hidden, inter, generator=gen)
    x = torch.randn(3, hidden, generator=gen)
    qkv_parts, mlp_out = [], torch.zeros(3, hidden)
    for rank in range(tp):
        qkv = QKVParallelLinear(hidden, d, heads, kv_heads, tp_rank=rank, tp_size=tp)
        for shard, w in full.items():
            qkv.weight_loader(qkv.weight, w, shard)
        qkv_parts.append(qkv(x))
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter], tp_rank=rank, tp_size=tp)
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        row = RowParallelLinear(inter, hidden, tp_rank=rank, tp_size=tp, reduce_results=False)
        row.weight_loader(row.weight, down)
        g, u = gate_up(x).chunk(2, dim=-1)
        mlp_out += row(torch.nn.functional.silu(g) * u)
    ref_q, ref_k, ref_v = (x @ full[p].T for p in "qkv")
    q_size, kv_size = heads // tp * d, kv_heads // tp * d
    torch.testing.assert_close(torch.cat([p[:, :q_size] for p in qkv_parts], -1), ref_q)
    torch.testing.assert_close(torch.cat([p[:, q_size : q_size + kv_size] for p in qkv_parts], -1), ref_k)
    torch.testing.assert_close(torch.cat([p[:, q_size + kv_size :] for p in qkv_parts], -1), ref_v)
    ref_mlp = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp_out, ref_mlp)
    # More ranks than KV heads: each KV head is replicated on tp / kv_heads ranks.
    kv_rank3 = QKVParallelLinear(hidden, d, heads, kv_heads, tp_rank=3, tp_size=4)
    kv_rank3.weight_loader(kv_rank3.weight, full["k"], "k")
    assert torch.equal(kv_rank3.weight[d : 2 * d], full["k"][d:])
    emb = VocabParallelEmbedding(11, hidden, tp_rank=1, tp_size=2)  # 11 rows padded to 12: rank 1 holds 6..10 + 1 pad
    table = torch.randn(11, hidden, generator=gen)
    emb.weight_loader(emb.weight, table)
    assert torch.equal(emb.weight[:5], table[6:]) and not emb.weight[5].any()


def _tensor_parallel_worker(rank: int, path: str, rendezvous: str, out: str) -> None:
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=60)  # a rank that dies must not leave the other waiting for ever
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2, timeout=timeout)
    try:
        model, config = load_model(path, torch.float32, tp_rank=rank, tp_size=2)
        h = Harness(model, config, tp_size=2)
        prefill = h.run([0, 1], [random_ids(9, 60), random_ids(4, 61)])
        decode = h.run([0, 1], [[7], [8]], decode=True)
        if rank == 0:
            torch.save([*prefill, *decode], out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tensor_parallel_model_matches_single_rank(make_tiny_model: MakeTinyModel, tmp_path: pathlib.Path) -> None:
    """Two gloo ranks, each loading only its shards, produce the single-rank logits."""
    path = make_tiny_model("qwen2")  # q/k/v biases too; 4 heads, 2 KV heads -> one KV head per rank
    out = tmp_path / "tp_logits.pt"
    torch.multiprocessing.spawn(
        _tensor_parallel_worker, args=(str(path), str(tmp_path / "rdzv"), str(out)), nprocs=2, join=True
    )
    model, config = load_model(path, torch.float32)
    h = Harness(model, config)
    ref = h.run([0, 1], [random_ids(9, 60), random_ids(4, 61)]) + h.run([0, 1], [[7], [8]], decode=True)
    for got, want in zip(torch.load(out), ref, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("rows", [1, 5, 32, 33])
@pytest.mark.parametrize("out_features", [96, 97])  # 97 rows cannot be cut into blocks: plain F.linear
def test_skinny_linear_equals_linear(rows: int, out_features: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 40, generator=gen), torch.randn(out_features, 40, generator=gen), torch.randn(out_features)
    for bias in (None, b):
        got = skinny_linear(x, w, bias)
        assert got.shape == (rows, out_features) and got.is_contiguous()
        torch.testing.assert_close(got, torch.nn.functional.linear(x, w, bias), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, PACKED_MIN_ROWS - 1, PACKED_MIN_ROWS, 33, 300])
def test_packed_linear_equals_linear(rows: int) -> None:
    layer = RowParallelLinear(40, 96, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(rows, 40, generator=torch.Generator().manual_seed(rows))
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert pack_cpu_weights(layer) == 96 * 40 * 4 and layer.packed_weight is not None
    torch.testing.assert_close(layer(x), want, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(linear(x, layer.weight, None, layer.packed_weight), want - layer.bias, atol=1e-4, rtol=1e-5)


def test_packing_covers_every_linear_and_the_lm_head(make_tiny_model: MakeTinyModel) -> None:
    model, _ = load_model(make_tiny_model("llama"), torch.float32)
    slots = [m for m in model.modules() if hasattr(m, "packed_weight")]
    assert pack_cpu_weights(model) == sum(m.weight.numel() * 4 for m in slots)
    assert all(m.packed_weight is not None for m in slots) and model.lm_head in slots
    assert len(slots) == 1 + 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down per layer
    bf16, _ = load_model(make_tiny_model("llama"), torch.bfloat16)
    assert pack_cpu_weights(bf16) == 0  # fp32 only


@pytest.mark.parametrize("disable", [False, True])
def test_the_engine_packs_cpu_weights_unless_told_not_to(make_tiny_model: MakeTinyModel, disable: bool) -> None:
    from loom.runtime.model_executor.model_runner import ModelRunner
    from loom.runtime.server_args import ServerArgs

    args = ServerArgs(model_path=str(make_tiny_model("llama")), device="cpu", dtype="float32", max_total_tokens=64,
                      disable_cpu_weight_packing=disable)  # fmt: skip
    runner = ModelRunner(args)
    assert (runner.model.lm_head.packed_weight is None) == disable
    assert (runner.model.model.layers[0].mlp.down_proj.packed_weight is None) == disable


def test_attention_backend_registry() -> None:
    assert isinstance(create_attention_backend("auto", "cpu"), TorchNativeAttnBackend)
    with pytest.raises(ValueError, match="not available yet"):
        create_attention_backend("triton", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        create_attention_backend("nope", "cpu")
