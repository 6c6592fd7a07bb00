"""JSONSchemaBench coverage and speed of the grammar backends (outlines, xgrammar, llguidance).

For each backend and each dataset (a seeded sample of N schemas per dataset):

- compile: success rate; failures split into refused (a GrammarError naming the problem),
  crashed (any other exception) and timed out; compile time p50 / p90;
- a generated sample per compiled schema: a seeded random walk under the mask (Gumbel noise over
  the vocabulary, as a random-weight model at temperature 1 would give, with a growing bonus on
  tokens holding '"', '}', ']' or ',' so that outputs close within the budget); per-mask time p50 / p99;
- outputs: valid (json.loads + `jsonschema` with the schema's own draft, formats not asserted),
  invalid, or unfinished (the token budget ran out first).

Every job runs in a worker process so that a hung or crashed compilation costs only its own job.

`--vocab-size` picks the locally trained byte-level BPE (8192 by default; 32768 and 131072 for the
32k / 128k rows of BENCHMARKS.md, see `bench_tokenizer`). `--maskbench` runs MaskBench instead
(`<data>/maskbench`: a schema plus instances marked valid / invalid): each instance is tokenized
and fed to the compiled constraint token by token. A case *passes* as MaskBench counts it
(jsonschemabench/maskbench: "passing" vs compile error / validation error / invalidation error):
the schema compiles, every valid instance is accepted and every invalid one rejected. Also shown:
"valid acc." (valid instances accepted, over every case: a refused schema accepts none) and
"invalid rej." (invalid instances rejected, over compiled cases only: a refused schema rejects
trivially).

    python benchmarks/bench_grammar.py                       # ../shared/jsonschemabench, 6 per dataset
    python benchmarks/bench_grammar.py --per-dataset 20 --markdown out.md --csv out.csv
    python benchmarks/bench_grammar.py --vocab-size 131072 --datasets Glaiveai2K Kubernetes --per-dataset 3
    python benchmarks/bench_grammar.py --maskbench
"""

from __future__ import annotations

import argparse
import csv
import json
import multiprocessing as mp
import pathlib
import random
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

BACKENDS = ("outlines", "xgrammar", "llguidance")
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "jsonschemabench"
EOS = 0  # the demo tokenizers' <|endoftext|>


@dataclass
class JobResult:
    backend: str
    dataset: str
    schema: str
    status: str  # compiled | refused | crashed | timeout
    message: str = ""
    compile_s: float = 0.0
    mask_s: list[float] = field(default_factory=list)
    output: str = ""  # valid | invalid | unfinished | "" (not compiled)
    detail: str = ""


# ----------------------------------------------------------------------------- tokenizers


_LARGE_CORPUS_BYTES = 64_000_000


def bench_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer of `vocab_size` tokens, trained locally (no hub).

    Up to 49152 tokens this is `loom.tiny_tokenizer.tiny_tokenizer` (the stdlib corpus fills it). The
    stdlib runs out of merges near 58k, so larger vocabularies (the 128k of Llama 3) are trained on
    the stdlib corpus plus the first 64 MB of `.py` files in site-packages (sorted paths), and cached
    under the loom cache dir keyed by size and corpus hash.
    """
    from loom.tiny_tokenizer import tiny_tokenizer

    if vocab_size <= 49152:
        return tiny_tokenizer(vocab_size)
    import hashlib
    import site

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from loom.cache_dir import cache_dir
    from loom.tiny_tokenizer import SPECIAL_TOKENS, corpus

    texts = corpus()
    total = 0
    for root in sorted(site.getsitepackages()):
        for path in sorted(pathlib.Path(root).rglob("*.py")):
            if total > _LARGE_CORPUS_BYTES:
                break
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError):
                continue
            total += len(texts[-1])
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
    cached = cache_dir() / "tokenizers" / f"bench-bpe-{vocab_size}-{digest.hexdigest()[:16]}.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(texts, trainer=trainer)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tokenizer.save(str(tmp))
    tmp.replace(cached)
    return tokenizer


# ----------------------------------------------------------------------------- worker process

_STATE: dict[str, Any] = {}


def _init_worker(vocab_size: int, tokenizer: str | None, open_objects: bool = False) -> None:
    import torch

    torch.set_num_threads(1)
    from loom.runtime.constrained import token_bytes

    if tokenizer:
        if tokenizer.endswith(".gguf"):  # a GGUF model's own tokenizer (SmolLM2's: the real 49k vocabulary)
            from loom.runtime.server_args import ServerArgs
            from loom.runtime.tokenizer import load_tokenizer

            hf = load_tokenizer(ServerArgs(model_path=tokenizer))
        else:
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(tokenizer)
        tb, eos = token_bytes(hf), frozenset({hf.eos_token_id})
        width = max(len(hf), max(tb) + 1)
    else:
        tok = bench_tokenizer(vocab_size)

        class HFLike:  # the slice of a Hugging Face tokenizer that `token_bytes` reads
            all_special_ids = [0, 1, 2]
            added_tokens_decoder = {0: None, 1: None, 2: None}

            def get_vocab(self) -> dict[str, int]:
                return tok.get_vocab(with_added_tokens=True)

        tb, eos, width = token_bytes(HFLike()), frozenset({EOS}), vocab_size
    closer = torch.zeros(width)
    for i, b in tb.items():
        if any(c in b for c in b'"}],'):
            closer[i] = 1.0
    _STATE.update(open_objects=open_objects, tokenizer=None if tokenizer else tok, token_bytes=tb, eos=eos, width=width, closer=closer, backends={})
    import gc

    gc.collect()
    gc.freeze()  # as the scheduler process does once started: full collections skip what startup built


def _backend(name: str) -> Any:
    from loom.runtime.constrained import GrammarBackend

    if name not in _STATE["backends"]:
        backend = GrammarBackend(_STATE["token_bytes"], _STATE["width"], _STATE["eos"], grammar_backend=name, max_workers=1,
                                 json_open_objects=_STATE.get("open_objects", False))  # fmt: skip
        backend._token_vocab() if name == "outlines" else backend._native_compiler()  # kept out of compile times
        _STATE["backends"][name] = backend
    return _STATE["backends"][name]


def _crash(e: BaseException) -> str:
    """A crash's message with where it happened: the innermost frames of Loom's own code (a
    RecursionError's message alone says nothing of where it recursed)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/loom/" in f.filename or "/runtime/" in f.filename]
    where = " < ".join(f"{pathlib.Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
    return f"{type(e).__name__}: {str(e)[:200]} at {where or '?'}"


def run_job(backend_name: str, dataset: str, path: str, max_tokens: int, seed: int) -> JobResult:
    import torch

    from loom.runtime.constrained import GrammarError, allocate_token_bitmask, unpack_bitmask

    schema = json.loads(pathlib.Path(path).read_text())
    schema = schema.get("schema", schema) if "tests" in schema else schema  # maskbench cases wrap the schema
    res = JobResult(backend_name, dataset, pathlib.Path(path).name, "compiled")
    backend = _backend(backend_name)
    t0 = time.perf_counter()
    try:
        compiled = backend._compile("json_schema", json.dumps(schema))
    except GrammarError as e:
        res.status, res.message = "refused", str(e)[:300]
        return res
    except Exception as e:  # noqa: BLE001 - a crash is what is being counted
        res.status, res.message = "crashed", _crash(e)
        return res
    res.compile_s = time.perf_counter() - t0

    width, tb, eos = _STATE["width"], _STATE["token_bytes"], _STATE["eos"]
    gen = torch.Generator().manual_seed(seed)
    grammar = compiled.matcher()
    row = allocate_token_bitmask(1, width)
    out = bytearray()
    res.output = "unfinished"
    for step in range(max_tokens):
        t = time.perf_counter()
        grammar.fill_mask(row[0])
        res.mask_s.append(time.perf_counter() - t)
        allowed = unpack_bitmask(row, width)[0]  # [V] bool
        if not allowed.any():
            res.output, res.detail = "invalid", "empty mask before the end"
            break
        if any(allowed[e] for e in eos):
            token = min(e for e in eos if allowed[e])
        else:
            u = torch.rand(width, generator=gen).clamp_min(1e-12)
            scores = -torch.log(-torch.log(u)) + _STATE["closer"] * max(0.0, (step - 32) / 16)
            token = int(scores.masked_fill(~allowed, float("-inf")).argmax())
        if not grammar.accept_token(token):
            res.output, res.detail = "invalid", f"masked token {token} refused"
            break
        if token in eos:
            res.output = _validate(bytes(out), schema)
            break
        out += tb.get(token, b"")
        if grammar.is_terminated():
            res.output = _validate(bytes(out), schema)
            break
    if res.output != "valid":
        res.detail = res.detail or bytes(out[:160]).decode("utf-8", "replace")
    return res


# ----------------------------------------------------------------------------- MaskBench

# MaskBench asks whether the compiled constraint accepts each instance, not how it is spaced: an
# instance counts as accepted when any of these serialisations runs to an accepting state.
_SEPARATORS = ((",", ":"), (", ", ": "))


@dataclass
class MaskBenchResult:
    backend: str
    split: str
    case: str
    status: str  # compiled | refused | crashed | timeout
    valid_accepted: int = 0
    valid_total: int = 0
    invalid_rejected: int = 0
    invalid_total: int = 0
    message: str = ""  # the refusal, or the first instance judged wrongly

    @property
    def passed(self) -> bool:
        """MaskBench's "passing": compiled, every valid instance accepted, every invalid one rejected."""
        return self.status == "compiled" and self.valid_accepted == self.valid_total and self.invalid_rejected == self.invalid_total


def maskbench_split(name: str) -> str:
    """`Github_easy---o11171.json` -> Github_easy, `BFCL_java_0.json` -> BFCL, `JME_37.json` -> JME."""
    head = name.split("---")[0] if "---" in name else name.split("_")[0]
    return head.removesuffix(".json")


def _accepts(compiled: Any, text: str) -> bool:
    tok = _STATE["tokenizer"]
    grammar = compiled.matcher()
    for token in tok.encode(text, add_special_tokens=False).ids:
        if not grammar.accept_token(token):
            return False
    if grammar.is_terminated():
        return True
    return any(grammar.accept_token(e) for e in _STATE["eos"])


def run_maskbench_job(backend_name: str, path: str) -> MaskBenchResult:
    """Compile one MaskBench case's schema and feed it every test instance, token by token."""
    from loom.runtime.constrained import GrammarError

    case = json.loads(pathlib.Path(path).read_text())
    name = pathlib.Path(path).name
    res = MaskBenchResult(backend_name, maskbench_split(name), name, "compiled")
    try:
        compiled = _backend(backend_name)._compile("json_schema", json.dumps(case["schema"]))
    except GrammarError as e:
        res.status, res.message = "refused", str(e)[:300]
    except Exception as e:  # noqa: BLE001 - a crash is what is being counted
        res.status, res.message = "crashed", _crash(e)
    for test in case["tests"]:
        if res.status != "compiled" and not test["valid"]:
            continue  # a refused schema rejects everything: invalid instances count on compiled cases only
        texts = [json.dumps(test["data"], separators=sep, ensure_ascii=False) for sep in _SEPARATORS]
        accepted = res.status == "compiled" and any(_accepts(compiled, t) for t in texts)
        if test["valid"]:
            res.valid_total += 1
            res.valid_accepted += accepted
        else:
            res.invalid_total += 1
            res.invalid_rejected += not accepted
        if res.status == "compiled" and accepted != test["valid"] and not res.message:
            res.message = f"{'valid rejected' if test['valid'] else 'invalid accepted'}: {texts[0][:200]}"
    return res


def run_maskbench(args: argparse.Namespace) -> list[MaskBenchResult]:
    ctx = mp.get_context("spawn")
    cases = sorted((args.data / "maskbench").glob("*.json"))
    if not cases:
        raise SystemExit(f"--data {args.data}: no maskbench/*.json")
    results: list[MaskBenchResult] = []
    for backend in args.backends:
        pool = ctx.Pool(1, initializer=_init_worker, initargs=(args.vocab_size, args.tokenizer, args.open_objects))
        for i, path in enumerate(cases):
            job = pool.apply_async(run_maskbench_job, (backend, str(path)))
            try:
                res = job.get(timeout=args.timeout + (60 if i == 0 else 0))
            except Exception as e:  # noqa: BLE001 - a timeout or a dead worker: the case counts as not compiled
                case = json.loads(path.read_text())
                res = MaskBenchResult(backend, maskbench_split(path.name), path.name, "timeout" if isinstance(e, mp.TimeoutError) else "crashed",
                                      valid_total=sum(t["valid"] for t in case["tests"]), message=str(e)[:200])  # fmt: skip
                pool.terminate()
                pool = ctx.Pool(1, initializer=_init_worker, initargs=(args.vocab_size, args.tokenizer, args.open_objects))
            results.append(res)
            if args.verbose:
                print(f"{backend:<10} {res.case:<48} {res.status:<8} valid {res.valid_accepted}/{res.valid_total} "
                      f"invalid rejected {res.invalid_rejected}/{res.invalid_total} {res.message[:80]}", file=sys.stderr)  # fmt: skip
        pool.terminate()
    return results


# Published best empirical coverage on the full JSONSchemaBench (paper, Table 4), (the figures a backend must beat).
PUBLISHED_BEST = {"Glaiveai2K": "0.96 (Guidance)", "Github_easy": "0.86 (Guidance)", "Kubernetes": "0.91 (Guidance)",
                  "WashingtonPost": "0.94 (llama.cpp)", "Github_hard": "0.41 (Guidance)"}  # fmt: skip


def maskbench_table(results: list[MaskBenchResult], backends: list[str]) -> str:
    splits = sorted({r.split for r in results})
    lines = [
        "| split | cases | published best (coverage) | "
        + " | ".join(f"{b}: **pass** / compiled / valid acc. / invalid rej." for b in backends) + " |",
        "|---|---|---|" + "---|" * len(backends),
    ]
    for split in [*splits, "ALL"]:
        cells = []
        for b in backends:
            rs = [r for r in results if r.backend == b and (split == "ALL" or r.split == split)]
            va, vt = sum(r.valid_accepted for r in rs), sum(r.valid_total for r in rs)
            ir, it = sum(r.invalid_rejected for r in rs), sum(r.invalid_total for r in rs)
            comp = sum(r.status == "compiled" for r in rs)
            frac = lambda a, t: f"{a}/{t} ({a / t:.2f})" if t else "-"  # noqa: E731
            passed = sum(r.passed for r in rs)
            cells.append(f"**{passed / len(rs):.2f}** / {comp}/{len(rs)} / {frac(va, vt)} / {frac(ir, it)}" if rs else "-")
        n = len({r.case for r in results if split == "ALL" or r.split == split})
        lines.append(f"| {split} | {n} | {PUBLISHED_BEST.get(split, '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _validate(text: bytes, schema: Any) -> str:
    import jsonschema

    try:
        instance = json.loads(text.decode("utf-8"))
        jsonschema.validators.validator_for(schema)(schema).validate(instance)
    except (ValueError, jsonschema.ValidationError, jsonschema.SchemaError, RecursionError):
        return "invalid"
    return "valid"


# ----------------------------------------------------------------------------- driver


def sample_schemas(data: pathlib.Path, datasets: list[str], n: int, seed: int) -> list[tuple[str, pathlib.Path]]:
    if not data.is_dir():
        raise SystemExit(f"--data {data}: not a folder; expected the JSONSchemaBench datasets (one folder per split)")
    out = []
    for ds in datasets:
        files = sorted((data / ds).glob("*.json"))
        if not files:
            raise SystemExit(f"--data {data}: no {ds}/*.json; expected one folder per dataset")
        out += [(ds, f) for f in random.Random(f"{seed}/{ds}").sample(files, min(n, len(files)))]
    return out


def run_all(args: argparse.Namespace) -> list[JobResult]:
    ctx = mp.get_context("spawn")
    jobs = sample_schemas(args.data, args.datasets, args.per_dataset, args.seed)
    results: list[JobResult] = []

    def new_pool() -> Any:
        return ctx.Pool(1, initializer=_init_worker, initargs=(args.vocab_size, args.tokenizer))

    for backend in args.backends:
        pool = new_pool()
        for i, (ds, path) in enumerate(jobs):
            job = pool.apply_async(run_job, (backend, ds, str(path), args.max_tokens, args.seed + i))
            try:
                res = job.get(timeout=args.timeout + (60 if i == 0 else 0))  # the first job loads the vocabulary
            except mp.TimeoutError:
                res = JobResult(backend, ds, path.name, "timeout", f"over {args.timeout:g}s (compile + sample)")
                pool.terminate()
                pool = new_pool()
            except Exception as e:  # noqa: BLE001 - the worker died (a crash in native code)
                res = JobResult(backend, ds, path.name, "crashed", f"worker died: {type(e).__name__}: {e}")
                pool.terminate()
                pool = new_pool()
            results.append(res)
            if args.verbose:
                masks = sorted(res.mask_s)
                timing = f"{len(masks)} masks p50 {masks[len(masks) // 2] * 1e6:.0f} max {masks[-1] * 1e6:.0f} us" if masks else "no masks"
                print(f"{backend:<10} {ds:<16} {path.name:<28} {res.status:<8} {res.output:<10} {timing:<32} {res.message[:90]}", file=sys.stderr)
        pool.terminate()
    return results


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def summarise(results: list[JobResult], datasets: list[str], backends: list[str]) -> list[dict[str, Any]]:
    rows = []
    for ds in [*datasets, "ALL"]:
        for b in backends:
            rs = [r for r in results if r.backend == b and (ds == "ALL" or r.dataset == ds)]
            ok = [r for r in rs if r.status == "compiled"]
            masks = [m for r in ok for m in r.mask_s]
            comp = [r.compile_s for r in ok]
            p = {k: _pct(comp, q) for k, q in (("c50", 50), ("c90", 90), ("c99", 99))} | {k: _pct(masks, q) for k, q in (("m50", 50), ("m99", 99))}
            rows.append({
                "dataset": ds, "backend": b, "n": len(rs),
                "compiled": len(ok), "refused": sum(r.status == "refused" for r in rs),
                "crashed": sum(r.status == "crashed" for r in rs), "timeout": sum(r.status == "timeout" for r in rs),
                "compile_p50_ms": p["c50"] and p["c50"] * 1e3, "compile_p90_ms": p["c90"] and p["c90"] * 1e3,
                "compile_p99_ms": p["c99"] and p["c99"] * 1e3,
                "mask_p50_us": p["m50"] and p["m50"] * 1e6, "mask_p99_us": p["m99"] and p["m99"] * 1e6,
                "valid": sum(r.output == "valid" for r in ok), "invalid": sum(r.output == "invalid" for r in ok),
                "unfinished": sum(r.output == "unfinished" for r in ok),
            })  # fmt: skip
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def f(x: float | None, nd: int = 0) -> str:
        return "-" if x is None else f"{x:.{nd}f}"

    lines = [
        "| dataset | backend | compiled | refused | crash / timeout | compile p50 / p90 / p99 ms | mask p50 / p99 µs | valid | invalid | unfinished |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['backend']} | {r['compiled']}/{r['n']} | {r['refused']} | {r['crashed']} / {r['timeout']} "
            f"| {f(r['compile_p50_ms'], 1)} / {f(r['compile_p90_ms'], 1)} / {f(r['compile_p99_ms'], 1)} | {f(r['mask_p50_us'])} / {f(r['mask_p99_us'])} "
            f"| {r['valid']} | {r['invalid']} | {r['unfinished']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA, help="the JSONSchemaBench folder (one subfolder per dataset)")
    parser.add_argument("--datasets", nargs="+", default=None, help="dataset folders (default: every one but maskbench)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--per-dataset", type=int, default=6, help="schemas sampled per dataset")
    parser.add_argument("--max-tokens", type=int, default=400, help="token budget of each generated sample")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per schema (compile + sample) before it counts as timed out")
    parser.add_argument("--vocab-size", type=int, default=8192, help="size of the locally trained byte-level BPE tokenizer")
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer folder or a .gguf model file to use instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=pathlib.Path, default=None, help="also write the table here")
    parser.add_argument("--csv", type=pathlib.Path, default=None, help="also write one row per (dataset, backend) here")
    parser.add_argument("--failures", type=pathlib.Path, default=None, help="write every refused / crashed / invalid job (JSON lines)")
    parser.add_argument("--maskbench", action="store_true", help="run MaskBench (data/maskbench) instead: accept valid, reject invalid instances")
    parser.add_argument("--open-objects", action="store_true",
                        help="outlines backend: objects without additionalProperties admit undeclared properties (JSON Schema's reading)")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per job on stderr")
    args = parser.parse_args(argv)
    args.data = args.data.resolve()
    if args.datasets is None:
        args.datasets = sorted(p.name for p in args.data.iterdir() if p.is_dir() and p.name != "maskbench") if args.data.is_dir() else []
    t0 = time.perf_counter()
    if args.maskbench:
        if args.tokenizer:
            raise SystemExit("--maskbench runs on the locally trained tokenizer (--vocab-size), not --tokenizer")
        mb = run_maskbench(args)
        table = maskbench_table(mb, args.backends)
        print(table)
        if args.failures:
            with args.failures.open("w") as fh:
                for r in mb:
                    if not r.passed:
                        fh.write(json.dumps(asdict(r)) + "\n")
        print(f"\nMaskBench in {time.perf_counter() - t0:.0f}s; vocabulary: trained byte-level BPE, {args.vocab_size} tokens")
        if args.markdown:
            args.markdown.write_text(table + "\n")
        return 0
    results = run_all(args)
    rows = summarise(results, args.datasets, args.backends)
    table = markdown_table(rows)
    print(table)
    print(f"\n{len(results)} jobs in {time.perf_counter() - t0:.0f}s; vocabulary: "
          f"{args.tokenizer or f'trained byte-level BPE, {args.vocab_size} tokens'}")  # fmt: skip
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.failures:
        with args.failures.open("w") as fh:
            for r in results:
                if r.status != "compiled" or r.output != "valid":
                    fh.write(json.dumps({k: v for k, v in asdict(r).items() if k != "mask_s"}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
