"""The reliability campaign of issue 19, re-runnable: loopback only, bounded in count and time.

    python benchmarks/soak.py soak --requests 1000 --clients 64        # mixed soak: lost requests, statuses, latency, KV, RSS
    python benchmarks/soak.py soak --requests 4000 --checkpoint-every 500   # the RSS curve (scheduler memory stays flat?)
    python benchmarks/soak.py bad-input                                # the corpus, a small request timed beside each case
    python benchmarks/soak.py faults                                   # kill -9 of each process, SIGTERM in flight
    python benchmarks/soak.py all                                      # the three, as RELIABILITY.md reports them

Each subcommand starts its own `loom serve` on a free 127.0.0.1 port (`--model`, default: the model
`loom.default_model` chooses, SmolLM2-135M-Instruct when installed; `--server-args` adds flags) and
stops it after; `soak` and `bad-input` can use a running server instead (`--url`; RSS is then read
only if its processes are on this machine). What each part sends and checks is in
`benchmarks/reliability/` (workload.py, bad_inputs.py, faults.py). Markdown tables on stdout,
progress on stderr, everything also as JSON with `--json PATH`.

Goals (issue 19): 0 lost; 0 5xx on bad input; a small request beside any hostile one answered
within 5 s; the front's death leaves no process behind within 10 s; scheduler RSS after 4,000
varied requests within 10 % of its value after the first 500. The exit status is 1 when a goal
measured in the run is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shlex
import sys
import time
from dataclasses import asdict
from typing import Any

import httpx
from reliability.bad_inputs import Case, build_cases
from reliability.client import Outcome, send, small_request
from reliability.faults import CASES, run_fault
from reliability.report import bad_input_table, fault_table, latency_table, memory_table, soak_summary, status_counts, table
from reliability.server import LoomServer, rss_mib
from reliability.workload import make_requests

SMALL_REQUEST_GOAL_S = 5.0
LEFT_BEHIND_GOAL_S = 10.0
RSS_GOAL = 0.10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- soak
async def run_soak(srv: LoomServer, args: argparse.Namespace) -> dict[str, Any]:
    info = srv.info()
    pids = info.get("pids", {})
    reqs = make_requests(args.requests, args.seed, model=srv.model_name(), abandon=args.abandon)
    every = args.checkpoint_every or args.requests
    points = [_memory_point(srv, pids, "start")]
    outcomes: list[Outcome] = []
    deadline = time.monotonic() + args.max_seconds
    t0 = time.perf_counter()
    async with srv.client(timeout=args.request_timeout) as client:
        for start in range(0, len(reqs), every):
            phase = reqs[start : start + every]
            outcomes += await _closed_loop(client, phase, args.clients, deadline, args.request_timeout)
            log(f"soak: {len(outcomes)}/{len(reqs)} answered after {time.perf_counter() - t0:.0f}s")
            await asyncio.to_thread(srv.wait_idle)
            await asyncio.sleep(1.0)  # the scheduler hands its heap's free pages back on going idle
            points.append(_memory_point(srv, pids, f"after {len(outcomes)} requests"))
            if time.monotonic() > deadline:
                break
    duration = time.perf_counter() - t0
    info_after = srv.info()
    log("soak: /flush_cache")
    flushed = srv.flush()
    points.append(_memory_point(srv, pids, f"after /flush_cache ({flushed})"))
    return {"outcomes": outcomes, "not_sent": len(reqs) - len(outcomes), "duration": duration, "points": points,
            "info_after": info_after}  # fmt: skip


async def _closed_loop(client: httpx.AsyncClient, reqs: list, clients: int, deadline: float, timeout: float) -> list[Outcome]:
    """`clients` concurrent clients, each sending its next request once the last one is answered."""
    queue: asyncio.Queue = asyncio.Queue()
    for r in reqs:
        queue.put_nowait(r)
    results: list[Outcome] = []

    async def worker() -> None:
        while not queue.empty() and time.monotonic() < deadline:
            r = queue.get_nowait()
            results.append(await send(client, r.route, r.body, r.stream, kind=r.kind, abandon_after=r.abandon_after,
                                      timeout=timeout))  # fmt: skip

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def _memory_point(srv: LoomServer, pids: dict[str, int], label: str) -> dict[str, Any]:
    info = srv.info()
    point: dict[str, Any] = {"label": label, "memory": info["memory"], "rss": rss_mib(pids["scheduler"]) if "scheduler" in pids
                             else {"total": float("nan"), "kv_pool": float("nan"), "rest": float("nan")}}  # fmt: skip
    for name in ("detokenizer", "front"):
        if name in pids:
            point[f"{name}_rss"] = rss_mib(pids[name])["total"]
    return point


def soak_report(res: dict[str, Any], args: argparse.Namespace) -> tuple[str, list[tuple[str, bool, str]]]:
    outcomes = res["outcomes"]
    info = res["info_after"]
    mem = info["memory"]
    parts = [
        f"### Soak: {len(outcomes)} requests over {args.clients} clients (seed {args.seed}, {args.abandon:.0%} of streams abandoned)",
        soak_summary(outcomes, res["not_sent"], res["duration"]),
        status_counts(outcomes),
        latency_table(outcomes),
        "KV after the soak (before the flush): " + ", ".join(f"{k} {v}" for k, v in mem.items())
        + f"; running {info['num_running_reqs']}, waiting {info['num_waiting_reqs']}",
        memory_table(res["points"]),
    ]
    lost = sum(o.lost or o.duplicated for o in outcomes)
    goals = [("every request answered exactly once", lost == 0, f"{lost} lost or duplicated of {len(outcomes)}"),
             ("no KV held by a request after the soak", mem["held"] == 0 and mem["protected"] == 0,
              f"held {mem['held']}, protected {mem['protected']}")]  # fmt: skip
    by_label = {p["label"]: p["rss"] for p in res["points"]}
    first, last = by_label.get("after 500 requests"), by_label.get("after 4000 requests")
    if first and last:
        for key, what in (("total", "scheduler RSS"), ("rest", "scheduler RSS less the KV pool")):
            growth = last[key] / first[key] - 1
            goals.append((f"{what} after 4,000 within 10 % of after 500", abs(growth) <= RSS_GOAL,
                          f"{first[key]:.0f} -> {last[key]:.0f} MiB ({growth:+.1%})"))  # fmt: skip
    return "\n\n".join(parts), goals


# ---------------------------------------------------------------------------- bad input
async def run_bad_inputs(srv: LoomServer, api_key: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    info = srv.info()
    cases = build_cases(srv.model_name(), info["context_length"] or 4096, api_key)
    if args.cases:
        cases = [c for c in cases if any(p in c.name for p in args.cases.split(","))]
    results = []
    async with srv.client(timeout=120) as keyed, httpx.AsyncClient(base_url=srv.url, trust_env=False, timeout=120) as bare:
        for i, case in enumerate(cases):
            hostile = asyncio.create_task(_send_case(keyed if case.with_key else bare, case, args.case_timeout))
            await asyncio.sleep(0.2)  # the hostile request is in: being read, parsed or worked on
            small_s, small_status = await small_request(keyed, timeout=60)
            status, latency, body, error = await hostile
            ok = status in case.expect
            results.append({"name": case.name, "method": case.method, "path": case.path, "expect": list(case.expect),
                            "status": status, "latency": latency, "small_latency": small_s, "small_status": small_status,
                            "ok": ok, "body": body, "error": error, "why": case.why})  # fmt: skip
            if not ok:
                log(f"bad input {i + 1}/{len(cases)} {case.name}: expected {case.expect}, got {status} {body[:100]!r}")
            if srv.proc is not None and srv.proc.poll() is not None:
                log(f"the server exited (code {srv.proc.returncode}) after {case.name!r}; stopping the corpus here")
                break
    return results


async def _send_case(client: httpx.AsyncClient, case: Case, timeout: float) -> tuple[int | None, float, str, str]:
    t0 = time.perf_counter()
    try:
        r = await client.request(case.method, case.path, content=case.body, headers=case.headers, timeout=timeout)
        return r.status_code, time.perf_counter() - t0, r.text[:300], ""
    except httpx.HTTPError as exc:
        return None, time.perf_counter() - t0, "", f"{type(exc).__name__}: {exc}"


def bad_input_report(results: list[dict[str, Any]]) -> tuple[str, list[tuple[str, bool, str]]]:
    failing = [r for r in results if not r["ok"]]
    five = [r for r in results if r["status"] is not None and r["status"] >= 500]
    slowest = max(results, key=lambda r: r["small_latency"]) if results else None
    routes = sorted({r["path"] for r in results})
    parts = [f"### Bad input: {len(results)} cases over {len(routes)} routes ({', '.join(routes)})",
             table(["", "cases"], [["as expected", len(results) - len(failing)], ["not as expected", len(failing)],
                                   ["5xx", len(five)], ["no response", sum(r["status"] is None for r in results)]]),
             "Cases not as expected:\n\n" + (bad_input_table(results, only_failing=True) if failing else "none"),
             "Every case:\n\n" + bad_input_table(results)]  # fmt: skip
    goals = [("no 5xx on bad input", not five, f"{len(five)} of {len(results)}: " + ", ".join(r["name"] for r in five)),
             ("every bad input answered as the issue asks", not failing, f"{len(failing)} of {len(results)} not")]  # fmt: skip
    if slowest is not None:
        goals.append((f"a small request beside each answered within {SMALL_REQUEST_GOAL_S:g} s",
                      slowest["small_latency"] <= SMALL_REQUEST_GOAL_S and slowest["small_status"] == 200,
                      f"slowest {slowest['small_latency']:.2f} s (status {slowest['small_status']}) beside {slowest['name']!r}"))  # fmt: skip
    return "\n\n".join(parts), goals


# ---------------------------------------------------------------------------- faults
async def run_faults(args: argparse.Namespace, flags: list[str]) -> list[Any]:
    results = []
    for case in args.faults.split(","):
        log(f"fault: {case}")
        results.append(await run_fault(case, args.model, flags, in_flight=args.in_flight))
    return results


def fault_report(results: list[Any]) -> tuple[str, list[tuple[str, bool, str]]]:
    goals = []
    for r in results:
        if r.name == "kill-front":
            goals.append((f"the front's death leaves nothing behind within {LEFT_BEHIND_GOAL_S:g} s", not r.left,
                          f"gone after {r.gone_after_s:.2f} s" if not r.left else f"left: {', '.join(r.left)}"))  # fmt: skip
        else:
            goals.append((f"{r.name}: every request in flight answered, nothing left behind", not r.lost and not r.left,
                          f"lost {r.lost}, left {r.left or 'nothing'}, exit {r.exit_code}"))  # fmt: skip
    return "### Faults\n\n" + fault_table(results), goals


# ---------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("part", choices=("soak", "bad-input", "faults", "all"))
    p.add_argument("--model", default=None, help="a .gguf file or Hugging Face folder (default: loom.default_model's choice)")
    p.add_argument("--server-args", default="", help="extra `loom serve` flags, one quoted string")
    p.add_argument("--url", default=None, help="use this running server (soak, bad-input) instead of starting one")
    p.add_argument("--api-key", default=None, help="the running server's key (--url); a started one gets a fresh key")
    p.add_argument("--requests", type=int, default=1000, help="soak requests")
    p.add_argument("--clients", type=int, default=64, help="concurrent soak clients")
    p.add_argument("--abandon", type=float, default=0.10, help="fraction of streams the client leaves part-way")
    p.add_argument("--checkpoint-every", type=int, default=500, help="measure memory (idle) after every N soak requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=3600.0, help="soak time bound: no new request after it")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds a request may take to its final answer")
    p.add_argument("--cases", default=None, help="bad-input cases whose name contains one of these (comma-separated)")
    p.add_argument("--case-timeout", type=float, default=30.0,
                   help="seconds a bad-input case may take (one the server wrongly accepts may generate for minutes)")
    p.add_argument("--faults", default=",".join(CASES), help="fault cases to run (comma-separated)")
    p.add_argument("--in-flight", type=int, default=8, help="requests running when a fault strikes")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = p.parse_args(argv)
    if args.model is None:
        from loom.default_model import choose_model

        args.model = choose_model().path
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    flags = shlex.split(args.server_args)
    sections: list[str] = []
    goals: list[tuple[str, bool, str]] = []
    dump: dict[str, Any] = {"args": vars(args)}
    log(f"model: {args.model}")
    if args.part in ("soak", "all"):
        res = _with_server(args, flags, None, lambda srv: run_soak(srv, args))
        text, g = soak_report(res, args)
        sections.append(text)
        goals += g
        dump["soak"] = {**res, "outcomes": [asdict(o) for o in res["outcomes"]]}
    if args.part in ("bad-input", "all"):
        key = args.api_key or secrets.token_hex(8)
        results = _with_server(args, flags, key, lambda srv: run_bad_inputs(srv, key, args))
        text, g = bad_input_report(results)
        sections.append(text)
        goals += g
        dump["bad_input"] = results
    if args.part in ("faults", "all"):
        results = asyncio.run(run_faults(args, flags))
        text, g = fault_report(results)
        sections.append(text)
        goals += g
        dump["faults"] = [{**vars(r), "answers": dict(r.answers)} for r in results]
    sections.append("### Goals\n\n" + table(["goal", "met", "measured"], [[n, "yes" if ok else "NO", m] for n, ok, m in goals]))
    print("\n\n".join(sections))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1, default=str)
    return 0 if all(ok for _, ok, _ in goals) else 1


def _with_server(args: argparse.Namespace, flags: list[str], api_key: str | None, job: Any) -> Any:
    if args.url:
        srv = LoomServer.__new__(LoomServer)
        srv.url, srv.proc = args.url.rstrip("/"), None
        srv.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        return asyncio.run(job(srv))
    srv = LoomServer(args.model, flags, api_key=api_key)
    srv.start()
    try:
        return asyncio.run(job(srv))
    finally:
        srv.stop()


if __name__ == "__main__":
    raise SystemExit(main())
