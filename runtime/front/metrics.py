"""The front's Prometheus metrics (`/metrics`): what the front measures of each request, and the
scheduler's gauges, read when the page is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from loom.runtime.front.tokenizer_manager import ReqState
from loom.runtime.messages import SchedulerInfoOut

_COUNTED = "_loom_counted"


def mark_counted(exc: BaseException) -> BaseException:
    """Flag an error raised after its call's requests were counted, so the edge that answers it
    does not count it again as refused."""
    setattr(exc, _COUNTED, True)
    return exc


class FrontMetrics:
    """Prometheus metrics the front measures (the scheduler's gauges are read at scrape time)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("loom_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("loom_generation_tokens", "Generated tokens of finished requests", registry=r)
        self.cached_tokens = Counter("loom_cached_tokens", "Prompt tokens served from the radix cache", registry=r)
        # One count per generate request (each prompt and sample) that entered, by how it ended: stop, length,
        # abort (the scheduler's finish reasons), abandoned (its client left), aborted (the server ended it:
        # shutdown, a dead engine process), refused (answered 4xx/5xx; a call refused before it ran counts once).
        self.requests = Counter("loom_requests", "Requests by how they ended", ["finish_reason"], registry=r)
        self.ttft = Histogram("loom_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))  # fmt: skip
        self.itl = Histogram("loom_inter_token_latency_seconds", "Time between output tokens", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))  # fmt: skip
        self.e2e = Histogram("loom_e2e_request_latency_seconds", "Request latency, arrival to last token", registry=r,
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))  # fmt: skip
        self.running = Gauge("loom_num_running_reqs", "Requests decoding", registry=r)
        self.queued = Gauge("loom_num_queued_reqs", "Requests waiting for admission", registry=r)
        self.kv_usage = Gauge("loom_kv_cache_usage", "Share of KV slots in use (not free, not evictable)", registry=r)
        self.cache_hit_rate = Gauge("loom_cache_hit_rate", "Share of prompt tokens served from the radix cache", registry=r)

    def observe(self, state: ReqState, n_new: int, last_time: float | None, now: float) -> None:
        """One output of a running request: its first-token or inter-token latency."""
        if n_new:
            if last_time is None:
                self.ttft.observe(now - state.created)
            else:
                for _ in range(n_new):
                    self.itl.observe((now - last_time) / n_new)

    def count_end(self, state: ReqState, ending: str, now: float) -> None:
        """A request's end, exactly once: its finish reason when it finished, else `ending`
        (abandoned, aborted, refused). "refused" wins over a finish: the call was answered 4xx."""
        if state.finished and ending != "refused":
            self.prompt_tokens.inc(state.prompt_tokens)
            self.generation_tokens.inc(state.completion_tokens)
            self.cached_tokens.inc(state.cached_tokens)
            self.requests.labels(state.finished_reason.get("type", "unknown")).inc()
            self.e2e.observe(now - state.created)
        else:
            self.requests.labels(ending).inc()

    def count_refused(self, exc: BaseException | None = None) -> None:
        """A generate call answered with an error before it ran (one count per call), unless
        `exc` was raised by a call that counted its requests already (`mark_counted`)."""
        if exc is None or not getattr(exc, _COUNTED, False):
            self.requests.labels("refused").inc()

    def set_scheduler_gauges(self, info: SchedulerInfoOut) -> None:
        self.running.set(info.running)
        self.queued.set(info.waiting)
        mem = info.memory
        self.kv_usage.set((mem["capacity"] - mem["free"] - mem["evictable"]) / max(mem["capacity"], 1))
        self.cache_hit_rate.set(info.stats.get("cached_tokens", 0) / max(info.stats.get("prompt_tokens", 0), 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
