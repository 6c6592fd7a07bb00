"""Data-parallel replicas behind one front, with cache-aware routing.

    DataParallelEngine(server_args)   N AsyncEngines (each its own scheduler and detokenizer
                                      processes, each possibly tensor-parallel), one face: the HTTP
                                      routes and the front door use it exactly like one AsyncEngine.

Routing (as SGLang's router does it, in the front process): the front keeps an approximate radix
tree of the text it sent to each replica. A request goes to the replica whose tree holds the
longest prefix of it when that covers at least `CACHE_THRESHOLD` of the text; otherwise, or when
the load is badly skewed, to the replica with the fewest requests in flight. The trees only
approximate the replicas' real caches (they do not see evictions), so each is bounded and
forgets its least recently used text first. `dp_routing="round_robin"` is there to measure
against.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from loom.runtime.front.async_engine import AsyncEngine, EngineDeadError, GenerateAPI
from loom.runtime.front.metrics import FrontMetrics
from loom.runtime.messages import FlushCacheOut, SchedulerInfoOut
from loom.runtime.protocol import GenerateItem, GenerateRequest
from loom.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)

CACHE_THRESHOLD = 0.5  # share of a request's text that must be cached on a replica to follow its cache
BALANCE_ABS = 32  # in-flight difference beyond which load wins over cache ...
BALANCE_REL = 1.5  # ... when the busiest replica also has this many times the idlest one's load
TREE_MAX_CHARS = 4_000_000  # per replica: about what a large KV cache holds, in characters


class _Node:
    __slots__ = ("children", "key", "last_used", "parent")

    def __init__(self, key: str, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.children: dict[str, _Node] = {}
        self.last_used = 0


class ApproxRadixTree:
    """A character radix tree of the text sent to one replica: `match` gives how much of a text it
    has seen, `insert` records a text. Bounded: past `max_chars` it drops least recently used leaves."""

    def __init__(self, max_chars: int = TREE_MAX_CHARS) -> None:
        self.root = _Node("", None)
        self.size = 0
        self.max_chars = max_chars
        self._clock = itertools.count(1)

    def match(self, text: str) -> int:
        node, pos = self.root, 0
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                break
            common = _common_prefix(child.key, text, pos)
            pos += common
            if common < len(child.key):
                break
            node = child
        return pos

    def insert(self, text: str) -> None:
        now = next(self._clock)
        node, pos = self.root, 0
        node.last_used = now
        while pos < len(text):
            child = node.children.get(text[pos])
            if child is None:
                leaf = _Node(text[pos:], node)
                leaf.last_used = now
                node.children[text[pos]] = leaf
                self.size += len(leaf.key)
                break
            common = _common_prefix(child.key, text, pos)
            if common < len(child.key):  # split the edge where the texts part
                mid = _Node(child.key[:common], node)
                node.children[text[pos]] = mid
                child.key = child.key[common:]
                child.parent = mid
                mid.children[child.key[0]] = child
                mid.last_used = child.last_used
                child = mid
            child.last_used = now
            node, pos = child, pos + common
        self._evict()

    def _evict(self) -> None:
        if self.size <= self.max_chars:
            return
        leaves = [n for n in self._nodes() if not n.children and n is not self.root]
        leaves.sort(key=lambda n: n.last_used)
        for leaf in leaves:
            if self.size <= self.max_chars * 0.9:
                break
            self.size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]

    def _nodes(self) -> list[_Node]:
        out, todo = [], [self.root]
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children.values())
        return out


def _common_prefix(key: str, text: str, pos: int) -> int:
    n = min(len(key), len(text) - pos)
    i = 0
    while i < n and key[i] == text[pos + i]:
        i += 1
    return i


class CacheAwareRouter:
    def __init__(self, n: int, policy: str = "cache_aware") -> None:
        if policy not in ("cache_aware", "round_robin"):
            raise ValueError(f"dp_routing must be 'cache_aware' or 'round_robin', got {policy!r}")
        self.policy = policy
        self.trees = [ApproxRadixTree() for _ in range(n)]
        self.load = [0] * n
        self._rr = itertools.cycle(range(n))

    def route(self, key: str) -> int:
        if self.policy == "round_robin":
            choice = next(self._rr)
        else:
            least = min(range(len(self.load)), key=lambda i: (self.load[i], self.trees[i].size))
            busiest = max(self.load)
            skewed = busiest - self.load[least] > BALANCE_ABS and busiest > BALANCE_REL * self.load[least]
            matched = [t.match(key) for t in self.trees]
            best = max(range(len(matched)), key=lambda i: (matched[i], -self.load[i]))
            follow_cache = key and matched[best] >= CACHE_THRESHOLD * len(key)
            choice = best if follow_cache and not skewed else least
        self.trees[choice].insert(key)
        return choice


def route_key(text: str | None, input_ids: list[int] | None) -> str:
    """What the trees index: the text, or the token ids spelled as characters."""
    if text is not None:
        return text
    return "".join(map(chr, (min(t, 0x10FFFF) for t in input_ids)))


class DataParallelEngine(GenerateAPI):
    """`dp_size` AsyncEngines with AsyncEngine's face."""

    def __init__(self, server_args: ServerArgs, log_level: str = "warning") -> None:
        self.server_args = server_args
        # Replica i drives GPUs base_gpu_id + i * tp_per_node onwards, so replicas never share one; its
        # arguments keep dp_size, so its processes know how many share the CPU cores.
        self.replicas = [
            AsyncEngine(dataclasses.replace(server_args, base_gpu_id=server_args.base_gpu_id + i * server_args.tp_per_node),
                        log_level=log_level)
            for i in range(server_args.dp_size)
        ]  # fmt: skip
        self.metrics = FrontMetrics()
        for r in self.replicas:
            r.metrics = self.metrics  # one set of counters for the whole front
        self.router = CacheAwareRouter(server_args.dp_size, server_args.dp_routing)
        self.dead_reason: str | None = None
        self._on_death: Callable[[str], None] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    # ------------------------------------------------------------------ life cycle
    async def start(self, timeout_s: float = 600.0) -> None:
        results = await asyncio.gather(*(r.start(timeout_s) for r in self.replicas), return_exceptions=True)
        failed = [e for e in results if isinstance(e, BaseException)]
        if failed:
            await self.shutdown()
            raise failed[0]
        for r in self.replicas:
            r.on_death = self._replica_died

    def _replica_died(self, reason: str) -> None:
        # One replica down fails the server, as one dead scheduler does: never a silent half-capacity.
        if self.dead_reason:
            return
        self.dead_reason = reason
        for r in self.replicas:
            r._die(reason)
        if self._on_death is not None:
            self._on_death(reason)

    @property
    def on_death(self) -> Callable[[str], None] | None:
        return self._on_death

    @on_death.setter
    def on_death(self, fn: Callable[[str], None] | None) -> None:
        self._on_death = fn

    async def shutdown(self) -> None:
        await asyncio.gather(*(r.shutdown() for r in self.replicas))

    def stop_admitting(self, reason: str = "the server is shutting down") -> None:
        for r in self.replicas:
            r.stop_admitting(reason)

    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in self.replicas)

    def abort_all(self, reason: str) -> int:
        return sum(r.abort_all(reason) for r in self.replicas)

    async def off_loop(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await self.replicas[0].off_loop(fn, *args, **kwargs)

    @property
    def ready(self) -> Any:
        ready = self.replicas[0].ready
        if ready is None:
            return None
        total = sum(r.ready.max_total_tokens for r in self.replicas if r.ready)
        return dataclasses.replace(ready, max_total_tokens=total)

    @property
    def child_pids(self) -> dict[str, int]:
        return {f"{name}.dp{i}": pid for i, r in enumerate(self.replicas) for name, pid in r.child_pids.items()}

    @property
    def ipc_dir(self) -> str | None:
        return self.replicas[0].ipc_dir

    def check_alive(self) -> None:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        for r in self.replicas:
            r.check_alive()

    # ------------------------------------------------------------------ requests
    async def generate_items(self, request: GenerateRequest, items: list[GenerateItem]) -> AsyncIterator[Any]:
        """AsyncEngine.generate_items, each item routed on its own; results in item order."""
        self.check_alive()
        groups: dict[int, list[GenerateItem]] = {}
        for item in items:
            groups.setdefault(self.router.route(route_key(item.text, item.input_ids)), []).append(item)
        for replica, share in groups.items():
            self.router.load[replica] += len(share)
        gens = {replica: self.replicas[replica].generate_items(request, share) for replica, share in groups.items()}
        try:
            if not request.stream:
                outs = await asyncio.gather(*(g.__anext__() for g in gens.values()))
                results: dict[int, Any] = {}
                for share, out in zip(groups.values(), outs):
                    results.update((item.index, r) for item, r in zip(share, out))
                yield [results[item.index] for item in items]
                return
            async for _replica, chunk in _merge(gens):
                yield chunk  # chunk["index"] is the item's index in the whole request
        finally:
            for replica, share in groups.items():
                self.router.load[replica] -= len(share)
            for g in gens.values():
                await g.aclose()

    def abort(self, rid: str) -> bool:
        self.check_alive()
        return any([r.abort(rid) for r in self.replicas])

    async def flush_cache(self) -> FlushCacheOut:
        outs = await asyncio.gather(*(r.flush_cache() for r in self.replicas))
        failed = [o.message for o in outs if not o.success]
        if not failed:
            self.router = CacheAwareRouter(len(self.replicas), self.router.policy)
        return FlushCacheOut(not failed, "; ".join(failed))

    async def scheduler_info(self) -> SchedulerInfoOut:
        infos = await asyncio.gather(*(r.scheduler_info() for r in self.replicas))
        memory = {k: sum(i.memory[k] for i in infos) for k in infos[0].memory}
        stats = {k: sum(i.stats.get(k, 0) for i in infos) for k in infos[0].stats}
        return SchedulerInfoOut(memory, stats, sum(i.running for i in infos), sum(i.waiting for i in infos))

    async def replica_infos(self) -> list[SchedulerInfoOut]:
        return list(await asyncio.gather(*(r.scheduler_info() for r in self.replicas)))

    async def health_generate(self) -> None:
        await asyncio.gather(*(r.health_generate() for r in self.replicas))


async def _merge(gens: dict[int, AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Interleave several async iterators as their items arrive, tagged with their key."""
    pending = {asyncio.ensure_future(g.__anext__()): k for k, g in gens.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                key = pending.pop(fut)
                try:
                    item = fut.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(gens[key].__anext__())] = key
                yield key, item
    finally:
        for fut in pending:
            fut.cancel()
        if pending:
            await asyncio.wait(pending)
