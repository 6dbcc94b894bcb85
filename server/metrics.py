"""Prometheus metrics on a registry of the server's own (not the global one), so that one
process (a test) can run several servers.

Two kinds of figures:
- per request (counters and latency histograms), recorded by a ``RequestMeter`` that sees every
  event of its request on the scheduler's thread (prometheus_client is thread-safe); the two
  figures updated once per token (generated tokens, inter-token gaps) are kept as plain numbers
  under one lock per tier (``TokenFigures``) and exported at scrape time, since
  prometheus_client's per-observation cost was a sizeable part of streaming a token;
- state (slots, queues, KV blocks, rates, economics, Triton's TRT-LLM families), read at scrape
  time from the same ``ServerStats`` snapshot that GetStats returns.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from http.server import HTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.draft_metrics import drafter_families
from server.scheduler.types import Outcome, SchedEvent, Tier
from server.stats import ServerStats
from server.step_metrics import step_budget_families

# Latency buckets: TTFT and end-to-end span milliseconds to minutes on a CPU engine.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
log = logging.getLogger(__name__)
REJECTED = "rejected"  # the outcome label of a request refused at submit (queue full, draining)


class RequestMetrics:
    """The per-request families; one instance per server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        tier = ["tier"]
        self.requests = Counter(
            "backfill_requests",
            "Requests by final outcome.",
            ["tier", "outcome"],
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "backfill_prompt_tokens",
            "Prompt tokens of finished requests.",
            tier,
            registry=registry,
        )
        self.cached_tokens = Counter(
            "backfill_cached_prompt_tokens",
            "Prompt tokens served from the prefix cache.",
            tier,
            registry=registry,
        )
        self.draft_proposed = Counter(
            "backfill_draft_tokens_proposed",
            "Speculative decoding: draft tokens proposed.",
            tier,
            registry=registry,
        )
        self.draft_accepted = Counter(
            "backfill_draft_tokens_accepted",
            "Speculative decoding: draft tokens accepted.",
            tier,
            registry=registry,
        )
        self.ttft = Histogram(
            "backfill_ttft_seconds",
            "Arrival to first token.",
            tier,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            "backfill_queue_seconds",
            "Arrival to admission on the engine.",
            tier,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            "backfill_e2e_seconds",
            "Arrival to the final event.",
            tier,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )

        self.tokens = {tier: TokenFigures() for tier in Tier}
        registry.register(_TokenCollector(self.tokens))
        # Labelled children looked up once per tier: a labels() call per event cost more than
        # the observation itself on the streaming hot path.
        self._children = {tier: _TierChildren(self, tier.value) for tier in Tier}

    def meter(self, tier: Tier) -> RequestMeter:
        return RequestMeter(self._children[tier])

    def rejected(self, tier: Tier) -> None:
        self.requests.labels(tier.value, REJECTED).inc()


class _TierChildren:
    """One tier's labelled children of the request families."""

    __slots__ = (
        "cached_tokens", "draft_accepted", "draft_proposed", "e2e", "prompt_tokens", "queue",
        "requests", "tokens", "ttft",
    )

    def __init__(self, m: RequestMetrics, tier: str) -> None:
        self.requests = {o: m.requests.labels(tier, o.value) for o in Outcome}
        self.prompt_tokens = m.prompt_tokens.labels(tier)
        self.cached_tokens = m.cached_tokens.labels(tier)
        self.draft_proposed = m.draft_proposed.labels(tier)
        self.draft_accepted = m.draft_accepted.labels(tier)
        self.ttft = m.ttft.labels(tier)
        self.queue = m.queue.labels(tier)
        self.e2e = m.e2e.labels(tier)
        self.tokens = m.tokens[Tier(tier)]


class TokenFigures:
    """One tier's generated-token count and inter-token histogram (``_TOKEN_BUCKETS``).

    Updated once per event with any number of tokens: one lock, one bisect. ``observe(n, gap)``
    counts n tokens and, when ``gap`` is given, n inter-token gaps of ``gap`` seconds each.
    """

    __slots__ = ("_lock", "counts", "gaps_sum", "generated")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.generated = 0
        self.counts = [0] * (len(_TOKEN_BUCKETS) + 1)  # per bucket, not cumulative; last: +Inf
        self.gaps_sum = 0.0

    def observe(self, n: int, gap: float | None) -> None:
        with self._lock:
            self.generated += n
            if gap is not None:
                # Prometheus buckets are upper bounds, inclusive: the first bound >= gap.
                self.counts[bisect.bisect_left(_TOKEN_BUCKETS, gap)] += n
                self.gaps_sum += gap * n

    def snapshot(self) -> tuple[int, list[int], float]:
        with self._lock:
            return self.generated, list(self.counts), self.gaps_sum


class _TokenCollector(Collector):
    """Exports the tiers' TokenFigures as ``backfill_generated_tokens_total`` and the
    ``backfill_inter_token_seconds`` histogram."""

    def __init__(self, tokens: dict[Tier, TokenFigures]) -> None:
        self._tokens = tokens

    def collect(self) -> Iterator[Metric]:
        generated = CounterMetricFamily(
            "backfill_generated_tokens", "Tokens generated.", labels=["tier"]
        )
        gaps = HistogramMetricFamily(
            "backfill_inter_token_seconds",
            "Time between consecutive tokens of a request.",
            labels=["tier"],
        )
        bounds = [*map(str, map(float, _TOKEN_BUCKETS)), "+Inf"]
        for tier, figures in self._tokens.items():
            count, counts, total = figures.snapshot()
            generated.add_metric([tier.value], count)
            cumulative = itertools.accumulate(counts)
            gaps.add_metric([tier.value], list(zip(bounds, cumulative, strict=True)), total)
        yield generated
        yield gaps


class RequestMeter:
    """Records one request's events; ``observe`` is called with each event before it is
    handed on. Generated tokens are counted as they come, so the counter moves mid-stream."""

    __slots__ = ("_c", "_last")

    def __init__(self, children: _TierChildren) -> None:
        self._c = children
        self._last: float | None = None  # when the previous token arrived

    def observe(self, event: SchedEvent) -> None:
        n = len(event.token_ids)
        if n:
            now = time.monotonic()
            last, self._last = self._last, now
            self._c.tokens.observe(n, None if last is None else (now - last) / n)
        if event.outcome is not None:
            self._finish(event, event.outcome)

    def _finish(self, event: SchedEvent, outcome: Outcome) -> None:
        c = self._c
        c.requests[outcome].inc()
        if event.usage is not None:
            c.prompt_tokens.inc(event.usage.prompt_tokens)
            c.cached_tokens.inc(event.usage.cached_prompt_tokens)
            c.draft_proposed.inc(event.usage.draft_tokens_proposed)
            c.draft_accepted.inc(event.usage.draft_tokens_accepted)
        if event.timing is not None:
            t = event.timing
            if t.ttft_seconds is not None:
                c.ttft.observe(t.ttft_seconds)
            c.queue.observe(t.queue_seconds)
            c.e2e.observe(t.total_seconds)


class StateCollector(Collector):
    """State families, computed at scrape time from one ServerStats snapshot."""

    def __init__(self, stats: Callable[[], ServerStats], *, model: str, tokens_per_block: int):
        self._stats = stats
        self._model = model
        self._tokens_per_block = tokens_per_block

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield from _backfill_families(s)
        yield from step_budget_families(s.scheduler)
        yield from drafter_families(s.executor)
        yield from _triton_families(s, self._model, self._tokens_per_block)
        yield from _nvml_families()


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _backfill_families(s: ServerStats) -> Iterator[Metric]:
    sched, ex = s.scheduler, s.executor
    slots = GaugeMetricFamily("backfill_slots", "Batch slots by state.", labels=["state"])
    slots.add_metric(["online"], sched.online.running)
    slots.add_metric(["offline"], sched.offline.running)
    slots.add_metric(["free"], s.slots_free)
    yield slots
    queue = GaugeMetricFamily("backfill_queue_depth", "Requests waiting.", labels=["tier"])
    preempt = CounterMetricFamily(
        "backfill_preemptions", "Sequences preempted (by recompute).", labels=["tier"]
    )
    rate = GaugeMetricFamily(
        "backfill_tier_tokens_per_second", "Generated tokens/s by tier.", labels=["tier"]
    )
    for tier, t, tps in (
        ("online", sched.online, s.online_tokens_per_second),
        ("offline", sched.offline, s.offline_tokens_per_second),
    ):
        queue.add_metric([tier], t.queued)
        preempt.add_metric([tier], t.preemptions)
        rate.add_metric([tier], tps)
    yield from (queue, preempt, rate)
    kv = GaugeMetricFamily("backfill_kv_blocks", "KV-cache blocks by state.", labels=["state"])
    kv.add_metric(["used"], ex.kv_blocks_used)
    kv.add_metric(["cached"], ex.kv_blocks_cached)
    kv.add_metric(["free"], ex.kv_blocks_free)
    yield kv
    yield _gauge(
        "backfill_prefix_cache_hit_ratio",
        "Cached / prompt tokens since start.",
        s.prefix_cache_hit_ratio,
    )
    yield _gauge(
        "backfill_tokens_per_second", "Generated tokens/s, all tiers.", s.tokens_per_second
    )
    yield _gauge(
        "backfill_utilization_ratio", "Tokens/s over the engine's profiled peak.", s.utilization
    )
    yield _gauge(
        "backfill_cost_per_million_tokens",
        "Price per hour / tokens per hour × 1e6.",
        s.cost_per_million_tokens,
    )
    yield _gauge("backfill_slot_occupancy_ratio", "Mean occupied slots / slots.", s.slot_occupancy)
    yield _gauge("backfill_draining", "1 while shutting down.", float(sched.draining))
    yield _gauge("backfill_uptime_seconds", "Since the server started.", s.uptime_seconds)
    yield CounterMetricFamily("backfill_steps", "Executor iterations.", value=ex.steps)
    yield _gauge(
        "backfill_step_tokens", "Tokens computed in the last iteration.", ex.last_step_tokens
    )
    yield _gauge(
        "backfill_step_latency_seconds", "Duration of the last iteration.", ex.last_step_latency_s
    )


def _triton_families(s: ServerStats, model: str, tokens_per_block: int) -> Iterator[Metric]:
    """Triton's TRT-LLM backend families, with its semantics, so that routers that read Triton
    (the Gateway API Inference Extension's endpoint picker: queue = waiting, running =
    scheduled, KV usage = fraction) read a Backfill server the same way."""
    sched, ex = s.scheduler, s.executor
    labels = ["model", "request_type", "version"]
    running = sched.online.running + sched.offline.running
    waiting = sched.online.queued + sched.offline.queued + ex.queued
    req = GaugeMetricFamily("nv_trt_llm_request_metrics", "TRT-LLM request metrics", labels=labels)
    for kind, value in (
        ("active", running + waiting),
        ("max", s.slots_total),
        ("scheduled", running),
        ("context", getattr(ex, "context_requests", 0)),
        ("waiting", waiting),
    ):
        req.add_metric([model, kind, "1"], value)
    yield req
    labels = ["kv_cache_block_type", "model", "version"]
    kv = GaugeMetricFamily(
        "nv_trt_llm_kv_cache_block_metrics", "TRT-LLM KV cache block metrics", labels=labels
    )
    total = ex.kv_blocks_total
    # TensorRT-LLM counts reusable (cached, unreferenced) blocks as free.
    for kind, value in (
        ("max", total),
        ("free", ex.kv_blocks_free + ex.kv_blocks_cached),
        ("used", ex.kv_blocks_used),
        ("tokens_per", tokens_per_block),
        # Cumulative blocks served from the prefix cache, as TensorRT-LLM's reusedBlocks.
        ("reused", ex.cached_prompt_tokens // max(tokens_per_block, 1)),
        ("fraction", ex.kv_blocks_used / total if total else 0.0),
    ):
        kv.add_metric([kind, model, "1"], value)
    yield kv


@functools.cache
def _nvml() -> Any:
    """The pynvml module, initialized once; None without pynvml or an NVIDIA driver."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
    except Exception:  # no pynvml, or no driver: an ordinary CPU host
        return None
    return pynvml


def _nvml_families() -> Iterator[Metric]:
    """GPU SM and memory-bandwidth utilization where NVML answers; nothing elsewhere."""
    nvml = _nvml()
    if nvml is None:
        return
    sm = GaugeMetricFamily(
        "backfill_gpu_sm_utilization_ratio", "NVML SM utilization.", labels=["gpu"]
    )
    mem = GaugeMetricFamily(
        "backfill_gpu_memory_utilization_ratio",
        "NVML memory-bandwidth utilization.",
        labels=["gpu"],
    )
    try:
        for i in range(nvml.nvmlDeviceGetCount()):
            util = nvml.nvmlDeviceGetUtilizationRates(nvml.nvmlDeviceGetHandleByIndex(i))
            sm.add_metric([str(i)], util.gpu / 100.0)
            mem.add_metric([str(i)], util.memory / 100.0)
    except nvml.NVMLError as exc:  # a GPU fell off the bus: report what was read
        log.warning("NVML reading failed: %s", exc)
    yield sm
    yield mem


class MetricsEndpoint:
    """/metrics over HTTP for one registry; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        server: Any
        server, self._thread = start_http_server(port, addr=host, registry=registry)
        self._server: HTTPServer = server
        self.port: int = self._server.server_port
        self.url = f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
