"""bf16 on the CPU: what dtype "auto" picks, and golden tests of Loom in bf16 against Transformers
in bf16 on the same bf16 weights.

Where the arithmetic is the same, the results are: the weights Loom loads are bit for bit the
checkpoint's (tests/runtime/test_gguf.py checks GGUF files dequantised into bf16), and a quantized
layer in a bf16 model is its fp32 kernel's result rounded once to bf16 (below).

Where it is not, the tokens are compared within a stated tolerance. Loom computes what Transformers
computes in another order of summation: q/k/v and gate/up are one GEMM each (Transformers: three
and two), a decode step attends one query over the KV pool (Transformers, as run here, recomputes
the whole sequence through a causal prefill kernel), a batch and a cached prefix change the GEMM
and attention shapes (cascade attention merges two softmax parts). In fp32 that moves a logit by
~1e-6 and the fp32 golden tests (test_engine_golden.py) ask for equal tokens. In bf16 every
layer's output is rounded to 8 significant bits: a sum that differs in its last fp32 bits may
round to the neighbouring bf16 value (0.4 % of it), and that difference is carried through the
layers to the logits. So here each step is checked teacher-forced, Transformers running the
sequence Loom produced:

- Loom's logprob of each token it chose is within LOGPROB_TOL of Transformers' (log-softmax
  removes the common shift of all logits, so this bounds the per-token logit error);
- where Transformers' top-2 margin exceeds 2 * LOGPROB_TOL (two logits each off by at most the
  tolerance cannot swap), Loom chose Transformers' argmax; where it does not (a near tie), Loom's
  token is within that margin of the best;
- most steps are decided by a margin (the checks are not vacuous).

LOGPROB_TOL = 0.15 nats: over 324 steps of these tiny random models (three architectures, a
batch and a cached prefix) the difference was 0.0003 at the median, 0.061 at the 99th percentile
and 0.071 at most, two or three bf16 ulps of logits of a few units (an ulp there is 1/64 to
1/32). Twice that leaves room for another CPU's bf16 kernels (AVX2 machines emulate them) and
still catches a wrong token, a wrong position or a layer in the wrong precision (off by whole
units). Ties are common in bf16: 23 % of those steps had a top-2 margin within 2 * LOGPROB_TOL
(many exactly 0), so at least two thirds must be decided. (Loom's greedy tokens equalled
Transformers' own bf16 greedy loop, 12 tokens, on 26 of those 27 requests; the one that did not
went the other way at an exact tie.)
"""

from __future__ import annotations

import pathlib
import re
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from loom.checkpoint_writer import build_tiny_checkpoint
from loom.kernels.cpu import dequantize, quantize
from loom.runtime.entrypoints.engine import LocalEngine
from loom.runtime.layers.embedding import ParallelLMHead
from loom.runtime.layers.quantized import KERNEL_MAX_ROWS, quantized_linear
from loom.runtime.model_executor import device as device_mod
from loom.runtime.model_executor.device import resolve_dtype

from gguf_files import write_gguf
from golden import check_steps, hf_model, random_prompts, reference_logprobs

LOGPROB_TOL = 0.15
DECIDED_SHARE = 2 / 3  # of the steps, decided by a margin over 2 * LOGPROB_TOL
BF16_VS_FP32_TOL = 0.5  # bf16 against fp32 activations (the int8 test's docstring)
NEW_TOKENS = 12
BF16 = torch.bfloat16


def greedy(n: int = NEW_TOKENS) -> dict:
    return {"temperature": 0, "max_new_tokens": n, "ignore_eos": True}


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def bf16_dir(request, tmp_path_factory) -> pathlib.Path:
    """A bf16 checkpoint: both sides load the same bf16 weights, nothing is rounded at load."""
    path = tmp_path_factory.mktemp(f"bf16-{request.param}")
    return build_tiny_checkpoint(path, arch=request.param, vocab_size=512, dtype="bfloat16", seed=5)


def bf16_engine(path, **kw) -> LocalEngine:
    kw.setdefault("max_total_tokens", 4096)
    kw.setdefault("debug_check_memory", True)
    return LocalEngine(model_path=str(path), dtype="bfloat16", **kw)


def assert_close_to_hf(path, prompts: list[list[int]], outs: list[dict]) -> None:
    hf = hf_model(path, BF16)
    decided = steps = 0
    for prompt, out in zip(prompts, outs):
        tokens = out["output_ids"]
        logprobs = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        ref = reference_logprobs(hf, prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        d, n = check_steps(ref, tokens, logprobs, LOGPROB_TOL)
        decided, steps = decided + d, steps + n
    assert decided >= DECIDED_SHARE * steps, f"only {decided} of {steps} steps decided by a margin over the tolerance"


# ----------------------------------------------------------------------------- what "auto" picks


@pytest.mark.parametrize("flags, env, want", [
    (("avx512_bf16",), None, BF16),
    (("amx_bf16",), None, BF16),
    (("avx512_bf16", "amx_bf16"), None, BF16),
    ((), None, torch.float32),  # an AVX2-only CPU: bf16 would be emulated
    (("avx512_bf16",), "float32", torch.float32),  # the override, to reproduce fp32 results
    ((), "bfloat16", BF16),
])  # fmt: skip
def test_auto_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch, flags, env, want):
    monkeypatch.setattr(device_mod, "native_bf16_flags", lambda: flags)
    if env is None:
        monkeypatch.delenv(device_mod.CPU_AUTO_DTYPE_ENV, raising=False)
    else:
        monkeypatch.setenv(device_mod.CPU_AUTO_DTYPE_ENV, env)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, None) == want
    for name, dtype in (("float32", torch.float32), ("bfloat16", BF16), ("float16", torch.float16)):
        assert resolve_dtype(name, cpu, None) == dtype  # explicit dtypes are kept, whatever the CPU
    gpu = torch.device("cuda", 0)  # on a GPU the checkpoint decides, whatever the host CPU has
    assert resolve_dtype("auto", gpu, SimpleNamespace(dtype="float16")) == torch.float16
    assert resolve_dtype("auto", gpu, SimpleNamespace(dtype="float32")) == BF16


def test_a_bad_override_is_named(monkeypatch):
    monkeypatch.setenv(device_mod.CPU_AUTO_DTYPE_ENV, "fp32")
    with pytest.raises(ValueError, match=f"{device_mod.CPU_AUTO_DTYPE_ENV} must be float32 or bfloat16, got 'fp32'"):
        resolve_dtype("auto", torch.device("cpu"), None)


def test_native_bf16_flags_are_the_kernels_own():
    """The flags read through torch are the ones the kernel reports in /proc/cpuinfo."""
    cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    line = next(line for line in cpuinfo.splitlines() if line.startswith("flags"))
    kernel = set(line.split(":", 1)[1].split())
    assert set(device_mod.native_bf16_flags()) == kernel & set(device_mod.NATIVE_BF16_FLAGS)


@pytest.mark.parametrize("native", [True, False])
def test_an_auto_engine_runs_in_what_auto_picks(monkeypatch, make_tiny_model, native):
    """Weights, KV cache and attention in bf16 on a bf16 CPU; fp32 elsewhere. Logits reach
    sampling and logprobs in fp32 either way."""
    monkeypatch.setattr(device_mod, "native_bf16_flags", lambda: ("avx512_bf16",) if native else ())
    monkeypatch.delenv(device_mod.CPU_AUTO_DTYPE_ENV, raising=False)
    want = BF16 if native else torch.float32
    with LocalEngine(model_path=str(make_tiny_model("llama")), max_total_tokens=256) as engine:
        runner = engine.model_runner
        assert runner.dtype == want and runner.kv_dtype == want
        assert all(p.dtype == want for p in runner.model.parameters())
        assert runner.token_to_kv_pool.get_kv_buffer(0)[0].dtype == want
        hidden = torch.randn(2, runner.model.config.hidden_size, dtype=want)
        assert runner.compute_logits(hidden).dtype == torch.float32
        out = engine.generate(input_ids=[5, 6, 7], sampling_params=greedy(4), return_logprob=True)
    assert len(out["output_ids"]) == 4
    assert all(lp <= 0 for lp, _, _ in out["meta_info"]["output_token_logprobs"])


# ----------------------------------------------------------------------------- golden, bf16 vs bf16


def test_batch_matches_transformers_in_bf16(bf16_dir):
    """A batch arriving together: batched prefill and decode steps in bf16."""
    prompts = random_prompts(20, 5, 3, 40)
    with bf16_engine(bf16_dir) as engine:
        assert engine.model_runner.dtype == BF16
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(), return_logprob=True)
    assert_close_to_hf(bf16_dir, prompts, outs)


def test_cached_prefix_and_chunked_prefill_match_transformers_in_bf16(bf16_dir):
    """A shared 48-token prefix: the radix cache's hits, cascade attention (decode rows and short
    extends sharing the prefix's slots) and chunked prefill, all in bf16."""
    prefix = random_prompts(21, 1, 48, 48)[0]
    prompts = random_prompts(22, 4, 3, 10, prefix=prefix)
    with bf16_engine(bf16_dir, chunked_prefill_size=32) as engine:
        first = engine.generate(input_ids=prompts[0], sampling_params=greedy(), return_logprob=True)
        rest = engine.generate(input_ids=prompts[1:], sampling_params=greedy(), return_logprob=True)
    assert all(o["meta_info"]["cached_tokens"] >= len(prefix) for o in rest)
    assert_close_to_hf(bf16_dir, prompts, [first] + rest)


def test_overlap_schedule_matches_transformers_in_bf16(make_tiny_model):
    """The overlap scheduler (off by default on the CPU) in bf16: requests joining and leaving
    while the next step is already launched."""
    path = make_tiny_model("llama", vocab_size=512, dtype="bfloat16", seed=10)
    prompts = random_prompts(27, 4, 3, 30)
    with bf16_engine(path, disable_overlap_schedule=False) as engine:
        assert engine.scheduler.overlap
        outs = engine.generate(input_ids=prompts, sampling_params=[greedy(n) for n in (12, 3, 8, 1)], return_logprob=True)
    assert [len(o["output_ids"]) for o in outs] == [12, 3, 8, 1]
    assert_close_to_hf(path, prompts, outs)


def test_prompt_logprobs_match_transformers_in_bf16(make_tiny_model):
    """Prefill-only scoring (what select uses): every prompt token's logprob, and the top-2."""
    path = make_tiny_model("llama", vocab_size=512, dtype="bfloat16", seed=6)
    prompt = random_prompts(23, 1, 30, 30)[0]
    with bf16_engine(path) as engine:
        out = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                              logprob_start_len=0, top_logprobs_num=2)  # fmt: skip
    ref = reference_logprobs(hf_model(path, BF16), prompt)
    entries = out["meta_info"]["input_token_logprobs"][1:]
    assert [tok for _, tok, _ in entries] == prompt[1:]
    for pos, (lp, tok, _) in enumerate(entries, start=1):
        assert abs(lp - float(ref[pos - 1, tok])) <= LOGPROB_TOL, f"prompt position {pos}"


@pytest.mark.parametrize("logprobs", [False, True])
def test_constrained_decoding_matches_transformers_in_bf16(make_tiny_model, logprobs):
    """Greedy under a regex in bf16: Transformers' argmax over the tokens the grammar allows, step
    by step. Without logprobs, a step whose grammar allows few tokens computes only their logits
    (the CPU's sparse LM head); with them, every logit and the mask."""
    path = make_tiny_model("qwen2", vocab_size=512, dtype="bfloat16", seed=7)
    regex = r"(cat|dog|bird)s? [0-9]{2,4}"
    prompt = random_prompts(24, 1, 8, 8)[0]
    params = {"regex": regex, "temperature": 0, "max_new_tokens": 16}
    with bf16_engine(path, disable_jump_forward=True) as engine:
        out = engine.generate(input_ids=prompt, sampling_params=params, return_logprob=logprobs)
        matcher = engine.scheduler.get_grammar_backend().compile("regex", regex).result().matcher()
        vocab = engine.model_runner.vocab_size
    assert re.fullmatch(regex, out["text"]), out["text"]
    tokens = out["output_ids"]
    allowed = []
    bits = torch.arange(32, dtype=torch.int32)
    for tok in tokens:
        row = torch.zeros(-(-vocab // 32), dtype=torch.int32)
        matcher.fill_mask(row)
        ids = ((row[:, None] >> bits) & 1).flatten()[:vocab].nonzero().flatten()  # [n] allowed token ids
        assert tok in ids.tolist()
        allowed.append(ids)
        assert matcher.accept_token(tok)
    lps = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]] if logprobs else None
    ref = reference_logprobs(hf_model(path, BF16), prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
    check_steps(ref, tokens, lps, LOGPROB_TOL, allowed)


def test_gguf_file_dequantised_into_bf16_matches_transformers(tmp_path):
    """A GGUF file's F32, F16 and Q8_0 tensors dequantised into bf16 on both sides."""
    from gguf import GGMLQuantizationType as Q

    path = write_gguf(tmp_path / "m" / "model.gguf", "llama", [Q.F32, Q.F16, Q.Q8_0], seed=8)
    prompts = random_prompts(25, 3, 4, 20, vocab=380)
    with bf16_engine(path, quantization="none", max_total_tokens=1024) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(8), return_logprob=True)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=BF16).eval()
    for prompt, out in zip(prompts, outs):
        tokens = out["output_ids"]
        logprobs = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        ref = reference_logprobs(hf, prompt + tokens)[len(prompt) - 1 : len(prompt) - 1 + len(tokens)]
        check_steps(ref, tokens, logprobs, LOGPROB_TOL)


# ----------------------------------------------------------------------------- quantized layers in bf16


@pytest.mark.usefixtures("float_activations")  # the fp32 kernel, rounded: x kept in fp32
@pytest.mark.parametrize("qtype, rows", [("Q8_0", 1), ("Q4_1", 5), ("Q8_0", 40)])
def test_quantized_linear_in_bf16_is_the_fp32_kernel_rounded_once(qtype, rows):
    """On the kernel path (<= 16 rows), exact: a bf16 activation is widened (exactly), multiplied
    in fp32 by the dequantised blocks, and the result rounded to bf16 once. On the band path (more
    rows) the weights are dequantised into bf16 (each rounded once) for the CPU's bf16 GEMM, which
    accumulates in fp32: the fp32 product of those rounded weights, rounded once, up to summation
    order (one bf16 ulp)."""
    gen = torch.Generator().manual_seed(rows)
    blocks = quantize(torch.randn(96, 64, generator=gen), qtype)
    x = torch.randn(rows, 64, generator=gen).to(BF16)
    got = quantized_linear(x, blocks, qtype)
    assert got.dtype == BF16
    if rows <= KERNEL_MAX_ROWS:
        assert torch.equal(got, quantized_linear(x.float(), blocks, qtype).to(BF16))
    else:
        rounded = x.float() @ dequantize(blocks, qtype, 64).to(BF16).float().T
        torch.testing.assert_close(got.float(), rounded.to(BF16).float(), rtol=2**-7, atol=1e-3)
    # Against the fp32 product: one rounding of the result (kernel path), plus the weights' (band
    # path: 64 terms each off by 2^-9 relative, outputs of about 8).
    tol = 1e-2 if rows <= KERNEL_MAX_ROWS else 6e-2
    torch.testing.assert_close(got.float(), x.float() @ dequantize(blocks, qtype, 64).T, rtol=1e-2, atol=tol)


@pytest.mark.usefixtures("float_activations")  # the fp32 kernel, rounded: x kept in fp32
def test_a_quantized_lm_head_in_bf16_gives_fp32_logits_dense_and_sparse():
    """The head's logits are computed in fp32 from the blocks and not rounded to bf16 on the way
    to sampling; the grammar path's per-token logits are the same numbers."""
    gen = torch.Generator().manual_seed(3)
    head = ParallelLMHead(96, 64)
    head.weight.data = torch.randn(96, 64, generator=gen).to(BF16)
    assert head.quantize_("Q8_0")
    hidden = torch.randn(3, 64, generator=gen).to(BF16)
    got = head.compute_logits(hidden)
    want = hidden.float() @ dequantize(head.qweight, "Q8_0", 64).T
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    ids = torch.tensor([0, 17, 95])
    torch.testing.assert_close(head.logits_for_ids(hidden[1], ids), got[1, ids], rtol=1e-5, atol=1e-5)


def test_an_int8_engine_in_bf16_keeps_no_float_weights_and_tracks_fp32(make_tiny_model):
    """Quantized at load in a bf16 model: the linear layers hold only their blocks, and its greedy
    tokens are checked against the same blocks with fp32 activations, run teacher-forced over the
    bf16 engine's tokens (prompt logprobs and their top 2).

    This compares bf16 with fp32, so the tolerance is BF16_VS_FP32_TOL, not LOGPROB_TOL: rounding
    every layer's activations to bf16 moved the logprobs by 0.05 at the median and 0.33 at most
    over 72 steps of such models, quantized or not (the float model in bf16 against fp32: 0.21)."""
    path = make_tiny_model("llama", vocab_size=512, dtype="bfloat16", seed=9)  # the same blocks in both engines
    prompts = random_prompts(26, 3, 4, 20)
    with LocalEngine(model_path=str(path), dtype="bfloat16", quantization="int8", max_total_tokens=1024) as engine:
        model = engine.model_runner.model
        linears = [m for m in model.modules() if getattr(m, "qweight", None) is not None and m is not model.lm_head]
        assert linears and all(m.weight is None for m in linears)
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(8), return_logprob=True)
    seqs = [p + o["output_ids"] for p, o in zip(prompts, outs)]
    with LocalEngine(model_path=str(path), dtype="float32", quantization="int8", max_total_tokens=1024) as engine:
        refs = engine.generate(input_ids=seqs, sampling_params={"max_new_tokens": 0}, return_logprob=True,
                               logprob_start_len=0, top_logprobs_num=2)  # fmt: skip
    decided = steps = 0
    for prompt, out, ref in zip(prompts, outs, refs):
        entries = ref["meta_info"]["input_token_logprobs"][len(prompt) :]
        tops = ref["meta_info"]["input_top_logprobs"][len(prompt) :]
        for j, ((lp, tok, _), (ref_lp, ref_tok, _), top) in enumerate(
            zip(out["meta_info"]["output_token_logprobs"], entries, tops)
        ):
            assert tok == ref_tok and abs(lp - ref_lp) <= BF16_VS_FP32_TOL, f"step {j}: {lp:.4f} vs {ref_lp:.4f}"
            steps += 1
            if top[0][0] - top[1][0] > 2 * BF16_VS_FP32_TOL:
                decided += 1
                assert tok == top[0][1], f"step {j}: token {tok}, fp32's {top[0][1]}"
            else:
                assert ref_lp >= top[0][0] - 2 * BF16_VS_FP32_TOL, f"step {j}: token {tok} is not a near tie in fp32"
    assert steps == 8 * len(prompts) and decided > 0
