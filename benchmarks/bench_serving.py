"""Online serving benchmark: `loom serve` with the radix cache on vs off (or any servers named with
`--compare`, e.g. data-parallel routing policies), side by side in one run.

The script starts `python -m loom serve` twice on free 127.0.0.1 ports, one server after the
other (radix cache on, then `--disable-radix-cache`), and drives each with the same workload
through SGLang's native `POST /generate` API, streaming over server-sent events:

- Poisson arrivals at `--request-rate` requests/s, `--num-requests` requests in all;
- each request sends `input_ids` directly: random token ids in the model's vocabulary, a
  unique part of a random length in `--input-len`, and for a `--shared-prefix-fraction` of the
  requests, one of `--num-prefixes` shared "system prompts" of `--prefix-len` tokens in front;
- `sampling_params` {"max_new_tokens": n, "ignore_eos": true, "temperature": 0}, with n random
  in `--output-len`, so every request generates exactly n tokens.

The workload (prompts, output lengths, arrival times) is drawn once from `--seed` and replayed
unchanged against both servers. Each server gets one warm-up request and a cache flush before
its timed run. Reported per server: completed requests, request and output-token throughput,
time to first token (TTFT) and inter-token latency (ITL) p50/p99 in ms, and the fraction of
prompt tokens served from the cache (`meta_info.cached_tokens / prompt_tokens`); then the
on/off ratios. Output is a markdown table on stdout; progress and notes go to stderr.

    python benchmarks/bench_serving.py                      # demo model, defaults (~1 min on 2 CPU cores)
    python benchmarks/bench_serving.py --model /path/to/model --num-requests 256 --request-rate 16
    python benchmarks/bench_serving.py --num-prefixes 8 --compare 'cache-aware=--dp-size 2' \
        --compare 'round-robin=--dp-size 2 --dp-routing round_robin'   # data-parallel routing

The defaults (256 requests at 16 req/s) put the demo model's radix-off server near saturation on
2 CPU cores (it sustains about 15 req/s on this workload); at much lower rates both servers just
keep up with the arrivals, throughput equals the rate, and only the latencies differ.

Nothing here asserts a time: the figures are for reading, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

HOST = "127.0.0.1"
LOW_TOKEN_ID = 10  # stay clear of the special tokens (ids 0, 1, 2 in the demo tokenizer)


# ---------------------------------------------------------------------------- arguments
def int_range(text: str) -> tuple[int, int]:
    """'16-64' -> (16, 64); '32' -> (32, 32)."""
    try:
        lo, _, hi = text.partition("-")
        lo_i, hi_i = int(lo), int(hi) if hi else int(lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI (integers), got {text!r}") from None
    if lo_i < 0 or hi_i < lo_i:
        raise argparse.ArgumentTypeError(f"expected 0 <= LO <= HI, got {text!r}")
    return lo_i, hi_i


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Serving benchmark: start `loom serve` with the radix cache on and off, drive each with the "
        "same Poisson workload with a shared-prefix mix over streaming POST /generate, and print a markdown "
        "table of throughput, TTFT, ITL and cached-token fraction side by side.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help="a .gguf file or Hugging Face folder to serve (default: the built-in random-weight demo model, "
                        "built on first use by loom.demo_model.demo_model_path())")
    p.add_argument("--num-requests", type=int, default=256, help="requests sent to each server")
    p.add_argument("--request-rate", type=float, default=16.0,
                   help="mean arrival rate in requests/s (Poisson arrivals); inf sends them all at once")
    p.add_argument("--input-len", type=int_range, default=(16, 64),
                   help="length range LO-HI of each request's own (unshared) prompt tokens, uniform")
    p.add_argument("--output-len", type=int_range, default=(8, 32),
                   help="range LO-HI of max_new_tokens per request, uniform (ignore_eos is on, so exactly that many)")
    p.add_argument("--shared-prefix-fraction", type=float, default=0.75,
                   help="fraction of requests whose prompt starts with one of the shared prefixes")
    p.add_argument("--num-prefixes", type=int, default=4, help="number of distinct shared prefixes (system prompts)")
    p.add_argument("--prefix-len", type=int, default=512, help="tokens in each shared prefix")
    p.add_argument("--seed", type=int, default=0, help="seed for prompts, lengths and arrival times")
    p.add_argument("--only", choices=("on", "off"), default=None,
                   help="run only one server: radix cache on, or off (default: both)")
    p.add_argument("--compare", action="append", default=None, metavar="NAME=FLAGS",
                   help="instead of radix on/off, compare these servers (repeat the option), e.g. "
                        "--compare 'cache-aware=--dp-size 2' --compare 'round-robin=--dp-size 2 --dp-routing round_robin'")
    p.add_argument("--server-args", default="",
                   help="extra flags for `loom serve`, one quoted string, e.g. \"--max-total-tokens 20000\"")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="seconds to wait for a server's /health before giving up")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds one request may take before it counts as failed")
    p.add_argument("--output-json", default=None, help="also write the per-server results to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    args = p.parse_args(argv)
    if args.num_requests < 1:
        p.error("--num-requests must be >= 1")
    if not args.request_rate > 0:
        p.error("--request-rate must be > 0 (inf for all at once)")
    if not 0.0 <= args.shared_prefix_fraction <= 1.0:
        p.error("--shared-prefix-fraction must be in [0, 1]")
    if args.num_prefixes < 1 or args.prefix_len < 0:
        p.error("--num-prefixes must be >= 1 and --prefix-len >= 0")
    if args.output_len[0] < 1:
        p.error("--output-len must be >= 1 (TTFT needs a token)")
    return args


# ---------------------------------------------------------------------------- workload
@dataclass
class Request:
    input_ids: list[int]
    max_new_tokens: int
    arrival: float  # seconds after the start of the run
    prefix: int | None  # which shared prefix, or None


def build_workload(args: argparse.Namespace, vocab_size: int) -> list[Request]:
    rng = random.Random(args.seed)
    hi_id = vocab_size - 1
    if hi_id <= LOW_TOKEN_ID:
        raise SystemExit(f"vocab_size {vocab_size} is too small")

    def tokens(n: int) -> list[int]:
        return [rng.randint(LOW_TOKEN_ID, hi_id) for _ in range(n)]

    prefixes = [tokens(args.prefix_len) for _ in range(args.num_prefixes)]
    n = args.num_requests
    shared = set(rng.sample(range(n), round(args.shared_prefix_fraction * n)))
    reqs, t = [], 0.0
    for i in range(n):
        if i > 0 and math.isfinite(args.request_rate):
            t += rng.expovariate(args.request_rate)
        which = rng.randrange(args.num_prefixes) if i in shared else None
        own = tokens(rng.randint(*args.input_len))
        if which is None and not own:
            own = tokens(1)  # a prompt needs at least one token
        ids = (prefixes[which] if which is not None else []) + own
        reqs.append(Request(ids, rng.randint(*args.output_len), t, which))
    return reqs


# ---------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """`python -m loom serve` as a subprocess on a free 127.0.0.1 port; SIGTERM on stop()."""

    def __init__(self, model: str, flags: list[str], startup_timeout: float) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="loom-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "loom", "serve", "--model", model, "--host", HOST, "--port", str(self.port)]
        self.cmd = cmd + flags
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        print(f"starting: {shlex.join(self.cmd)}  (log: {self.log.name})", file=sys.stderr)
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(trust_env=False, timeout=5.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after {self.startup_timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.5)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "".join(Path(self.log.name).read_text(errors="replace").splitlines(keepends=True)[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, then wait; SIGKILL only if it has not exited after 60 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            print(f"server pid {self.proc.pid} ignored SIGTERM for 60 s; killing it", file=sys.stderr)
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            print(f"note: server pid {self.proc.pid} exited with code {self.proc.returncode}", file=sys.stderr)


# ---------------------------------------------------------------------------- client
@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from send to the first output token
    itls: list[float] = field(default_factory=list)  # seconds per token after the first
    latency: float = 0.0
    output_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


async def send_one(client: httpx.AsyncClient, url: str, req: Request) -> Result:
    body = {
        "input_ids": req.input_ids,
        "sampling_params": {"max_new_tokens": req.max_new_tokens, "ignore_eos": True, "temperature": 0},
        "stream": True,
    }
    res = Result()
    t0 = time.perf_counter()
    last_t, n_ids, meta = t0, 0, None
    try:
        async with client.stream("POST", f"{url}/generate", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:200]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {chunk['error']}"
                    return res
                now = time.perf_counter()
                ids = chunk.get("output_ids", [])  # cumulative, as SGLang streams them
                new = len(ids) - n_ids
                if new > 0:
                    if n_ids == 0:
                        res.ttft = now - t0  # extra tokens in a first chunk add no ITL sample (as SGLang's bench)
                    else:
                        res.itls.extend([(now - last_t) / new] * new)
                    last_t, n_ids = now, len(ids)
                    res.output_ids = ids
                meta = chunk.get("meta_info", meta)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - t0
    if meta is None or n_ids == 0:
        res.error = "stream ended without output tokens"
        return res
    res.prompt_tokens = int(meta.get("prompt_tokens", len(req.input_ids)))
    res.cached_tokens = int(meta.get("cached_tokens", 0))
    res.completion_tokens = int(meta.get("completion_tokens", n_ids))
    res.ok = True
    return res


async def run_workload(url: str, reqs: list[Request], label: str, args: argparse.Namespace) -> tuple[list[Result], float]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(trust_env=False, limits=limits, timeout=timeout) as client:
        # warm-up (not timed), then an empty cache so both servers start equal
        warm = Request([LOW_TOKEN_ID + 1, LOW_TOKEN_ID + 2, LOW_TOKEN_ID + 3], 2, 0.0, None)
        w = await send_one(client, url, warm)
        if not w.ok:
            raise RuntimeError(f"warm-up request failed: {w.error}")
        (await client.post(f"{url}/flush_cache")).raise_for_status()

        bar = tqdm(total=len(reqs), desc=label, unit="req", file=sys.stderr, disable=args.no_progress)

        async def timed(req: Request) -> Result:
            await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
            r = await send_one(client, url, req)
            bar.update(1)
            return r

        start = time.perf_counter()
        results = await asyncio.gather(*(timed(r) for r in reqs))
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


# ---------------------------------------------------------------------------- report
def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); nan for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.completion_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "output_tokens": out_tokens,
        "prompt_tokens": prompt,
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(itls, 50),
        "itl_p99_ms": 1000 * percentile(itls, 99),
        "e2e_p50_ms": 1000 * percentile([r.latency for r in ok], 50),
        "cached_fraction": sum(r.cached_tokens for r in ok) / max(prompt, 1),
    }


ROWS = [  # (key, label, format)
    ("completed", "completed requests", "{:.0f}"),
    ("failed", "failed requests", "{:.0f}"),
    ("duration_s", "duration (s)", "{:.2f}"),
    ("request_throughput", "request throughput (req/s)", "{:.2f}"),
    ("output_throughput", "output token throughput (tok/s)", "{:.1f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:.1f}"),
    ("itl_p50_ms", "ITL p50 (ms)", "{:.1f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:.1f}"),
    ("e2e_p50_ms", "end-to-end latency p50 (ms)", "{:.1f}"),
    ("cached_fraction", "cached-token fraction", "{:.3f}"),
]


def ratio(a: float, b: float) -> str:
    if not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    names = list(summaries)
    both = len(names) == 2
    head = ["metric", *names] + ([f"{names[0]} / {names[1]}"] if both else [])
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label, fmt in ROWS:
        cells = [fmt.format(summaries[n][key]) for n in names]
        if both:
            on, off = summaries[names[0]][key], summaries[names[1]][key]
            cells.append("" if key in ("completed", "failed", "cached_fraction") else ratio(on, off))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        from loom.demo_model import demo_model_path

        print("using the built-in random-weight demo model (building it if needed) ...", file=sys.stderr)
        model = str(demo_model_path())
    else:
        model = args.model
    extra = shlex.split(args.server_args)
    configs = [("radix on", []), ("radix off", ["--disable-radix-cache"])]
    if args.only:
        configs = [c for c in configs if c[0] == f"radix {args.only}"]
    if args.compare:
        configs = []
        for spec in args.compare:
            name, sep, flags = spec.partition("=")
            if not sep or not name:
                raise SystemExit(f"--compare takes NAME=FLAGS, got {spec!r}")
            configs.append((name, shlex.split(flags)))

    reqs: list[Request] | None = None
    summaries: dict[str, dict[str, float]] = {}
    outputs: dict[str, list[list[int] | None]] = {}
    for label, flags in configs:
        server = Server(model, flags + extra, args.startup_timeout)
        try:
            server.start()
            if reqs is None:
                info = httpx.get(f"{server.url}/get_model_info", trust_env=False, timeout=30).json()
                vocab = int(info["vocab_size"])
                reqs = build_workload(args, vocab)
                n_shared = sum(r.prefix is not None for r in reqs)
                print(f"workload: {len(reqs)} requests, Poisson rate {args.request_rate}/s, seed {args.seed}; "
                      f"{n_shared} start with one of {args.num_prefixes} shared {args.prefix_len}-token prefixes; "
                      f"own prompt {args.input_len[0]}-{args.input_len[1]} tokens, "
                      f"output {args.output_len[0]}-{args.output_len[1]} tokens; vocab {vocab}; "
                      f"{sum(len(r.input_ids) for r in reqs)} prompt tokens, "
                      f"{sum(r.max_new_tokens for r in reqs)} output tokens in all", file=sys.stderr)
            results, duration = asyncio.run(run_workload(server.url, reqs, label, args))
        except Exception:
            print(f"--- {label}: server log tail ---\n{server.log_tail()}", file=sys.stderr)
            raise
        finally:
            server.stop()
        summaries[label] = summarize(results, duration)
        outputs[label] = [r.output_ids if r.ok else None for r in results]
        for r in results:
            if not r.ok:
                print(f"{label}: a request failed: {r.error}", file=sys.stderr)
                break
        server.log.close()
        if all(r.ok for r in results):
            os.unlink(server.log.name)  # keep the log only when something failed

    assert reqs is not None
    print(f"\n## Serving: {' vs '.join(summaries)}\n")
    print(f"{len(reqs)} requests, Poisson {args.request_rate} req/s, {args.shared_prefix_fraction:.0%} with one of "
          f"{args.num_prefixes} shared {args.prefix_len}-token prefixes, own prompt {args.input_len[0]}-"
          f"{args.input_len[1]} tokens, output {args.output_len[0]}-{args.output_len[1]} tokens, seed {args.seed}; "
          f"model {model}\n")
    print(markdown_table(summaries))
    if len(outputs) == 2:
        (name_a, a), (name_b, b) = outputs.items()
        same = sum(x is not None and x == y for x, y in zip(a, b))
        print(f"\n(greedy output ids equal between {name_a} and {name_b}: {same}/{len(reqs)})")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                      "model": model, "results": summaries}, indent=2))
    return 0 if all(s["failed"] == 0 for s in summaries.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
