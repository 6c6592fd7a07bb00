"""The campaign's markdown tables."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bench_serving import percentile

from reliability.client import Outcome


def table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.2f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def soak_summary(outcomes: list[Outcome], not_sent: int, duration: float) -> str:
    answered = [o for o in outcomes if not o.abandoned]
    rows = [
        ["requests sent", len(outcomes)],
        ["not sent (time bound)", not_sent],
        ["abandoned streams (client left on purpose)", sum(o.abandoned for o in outcomes)],
        ["lost (no final answer)", sum(o.lost for o in outcomes)],
        ["answered more than once", sum(o.duplicated for o in outcomes)],
        ["streams without [DONE]", sum(1 for o in answered if o.status == 200 and o.finals and not o.done
                                       and o.kind.split()[1] == "stream")],  # fmt: skip
        ["wall time (s)", duration],
        ["requests/s", len(outcomes) / duration if duration else float("nan")],
    ]
    return table(["soak", "value"], rows)


def status_counts(outcomes: list[Outcome]) -> str:
    counts = Counter("abandoned" if o.abandoned else (str(o.status) if o.status is not None else f"none: {o.error[:60]}")
                     for o in outcomes)  # fmt: skip
    return table(["status", "requests"], [[k, v] for k, v in sorted(counts.items())])


def latency_table(outcomes: list[Outcome]) -> str:
    """p50 / p99 seconds to the final answer, per kind of request (abandoned streams left out)."""
    by_kind: dict[str, list[float]] = {}
    for o in outcomes:
        if not o.abandoned and o.finals:
            by_kind.setdefault(o.kind, []).append(o.latency)
            by_kind.setdefault("all", []).append(o.latency)
    rows = [[k, len(v), percentile(v, 50), percentile(v, 99)] for k, v in sorted(by_kind.items())]
    return table(["kind", "answered", "p50 s", "p99 s"], rows)


def memory_table(points: list[dict[str, Any]]) -> str:
    rows = []
    for p in points:
        mem, rss = p["memory"], p["rss"]
        used = mem["capacity"] - mem["free"]
        rows.append([p["label"], rss["total"], rss["kv_pool"], rss["rest"], used, mem["evictable"], mem["protected"],
                     mem["held"], p.get("detokenizer_rss", float("nan")), p.get("front_rss", float("nan"))])  # fmt: skip
    return table(["when", "scheduler RSS MiB", "KV pool resident MiB", "RSS less KV pool MiB", "KV slots used",
                  "evictable", "protected", "held", "detokenizer RSS MiB", "front RSS MiB"], rows)  # fmt: skip


def bad_input_table(results: list[dict[str, Any]], only_failing: bool = False) -> str:
    rows = []
    for r in results:
        if only_failing and r["ok"]:
            continue
        rows.append([r["name"], r["method"] + " " + r["path"], "/".join(map(str, r["expect"])),
                     r["status"] if r["status"] is not None else f"none ({r['error'][:40]})", r["latency"],
                     r["small_latency"], r["small_status"], "ok" if r["ok"] else "FAIL", r["body"][:120]])  # fmt: skip
    return table(["case", "route", "expected", "got", "its s", "small request beside it s", "small status",
                  "verdict", "answer (start)"], rows)  # fmt: skip


def fault_table(results: list[Any]) -> str:
    rows = []
    for r in results:
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(r.answers.items()))
        first = "-" if r.first_answer_s is None else f"{r.first_answer_s:.2f}"
        last = "-" if r.last_answer_s is None else f"{r.last_answer_s:.2f}"
        rows.append([r.name, r.in_flight, answers, r.lost, first, last, r.exit_code, f"{r.gone_after_s:.2f}",
                     ", ".join(r.left) or "nothing", r.tracebacks])  # fmt: skip
    return table(["fault", "in flight", "answers", "lost", "first answer s", "last answer s", "server exit",
                  "all gone after s", "left after 10 s", "tracebacks in log"], rows)  # fmt: skip
