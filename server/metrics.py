"""Prometheus metrics on a registry of the server's own (not the global one), so that one
process (a test) can run several servers.

Two kinds of figures:
Every family carries a ``model`` label: each served model has its own engine, scheduler and
figures (a request routed with ``model=auto`` counts for the model that served it).

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
from dataclasses import dataclass
from http.server import HTTPServer
from typing import Any, Protocol

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


class Named(Protocol):
    """Whatever names the model a request runs on (a route: its name may settle late)."""

    @property
    def name(self) -> str: ...


class RequestMetrics:
    """The per-request families; one instance per server."""

    def __init__(self, registry: CollectorRegistry) -> None:
        tier = ["model", "tier"]
        self.requests = Counter(
            "backfill_requests",
            "Requests by final outcome.",
            ["model", "tier", "outcome"],
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
        self.tokens: dict[tuple[str, Tier], TokenFigures] = {}
        registry.register(_TokenCollector(self.tokens))
        # Labelled children looked up once per (model, tier): a labels() call per event cost
        # more than the observation itself on the streaming hot path.
        self._children: dict[tuple[str, Tier], _TierChildren] = {}
        self._lock = threading.Lock()

    def children(self, model: str, tier: Tier) -> _TierChildren:
        found = self._children.get((model, tier))
        if found is None:
            with self._lock:
                found = self._children.get((model, tier))
                if found is None:
                    figures = self.tokens.setdefault((model, tier), TokenFigures())
                    found = self._children[model, tier] = _TierChildren(self, model, tier,
                                                                         figures)
        return found

    def meter(self, tier: Tier, model: Named) -> RequestMeter:
        """A meter for one request, counted for ``model.name`` as it is at the first event."""
        return RequestMeter(self, tier, model)

    def rejected(self, tier: Tier, model: str) -> None:
        self.requests.labels(model, tier.value, REJECTED).inc()


class _TierChildren:
    """One model's and tier's labelled children of the request families."""

    __slots__ = (
        "cached_tokens", "draft_accepted", "draft_proposed", "e2e", "prompt_tokens", "queue",
        "requests", "tokens", "ttft",
    )

    def __init__(self, m: RequestMetrics, model: str, tier: Tier,
                 tokens: TokenFigures) -> None:
        labels = (model, tier.value)
        self.requests = {o: m.requests.labels(*labels, o.value) for o in Outcome}
        self.prompt_tokens = m.prompt_tokens.labels(*labels)
        self.cached_tokens = m.cached_tokens.labels(*labels)
        self.draft_proposed = m.draft_proposed.labels(*labels)
        self.draft_accepted = m.draft_accepted.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.queue = m.queue.labels(*labels)
        self.e2e = m.e2e.labels(*labels)
        self.tokens = tokens


class TokenFigures:
    """One model's and tier's generated-token count and inter-token histogram
    (``_TOKEN_BUCKETS``).

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
    """Exports the TokenFigures as ``backfill_generated_tokens_total`` and the
    ``backfill_inter_token_seconds`` histogram."""

    def __init__(self, tokens: dict[tuple[str, Tier], TokenFigures]) -> None:
        self._tokens = tokens

    def collect(self) -> Iterator[Metric]:
        generated = CounterMetricFamily(
            "backfill_generated_tokens", "Tokens generated.", labels=["model", "tier"]
        )
        gaps = HistogramMetricFamily(
            "backfill_inter_token_seconds",
            "Time between consecutive tokens of a request.",
            labels=["model", "tier"],
        )
        bounds = [*map(str, map(float, _TOKEN_BUCKETS)), "+Inf"]
        for (model, tier), figures in sorted(self._tokens.items(), key=lambda kv: (
                kv[0][0], kv[0][1].value)):
            count, counts, total = figures.snapshot()
            generated.add_metric([model, tier.value], count)
            cumulative = itertools.accumulate(counts)
            gaps.add_metric([model, tier.value], list(zip(bounds, cumulative, strict=True)),
                            total)
        yield generated
        yield gaps


class RequestMeter:
    """Records one request's events; ``observe`` is called with each event before it is
    handed on. Generated tokens are counted as they come, so the counter moves mid-stream."""

    __slots__ = ("_c", "_last", "_metrics", "_model", "_tier")

    def __init__(self, metrics: RequestMetrics, tier: Tier, model: Named) -> None:
        self._metrics = metrics
        self._tier = tier
        self._model = model
        self._c: _TierChildren | None = None
        self._last: float | None = None  # when the previous token arrived

    def observe(self, event: SchedEvent) -> None:
        c = self._c
        if c is None:  # the first event: the model that serves the request is settled
            c = self._c = self._metrics.children(self._model.name, self._tier)
        n = len(event.token_ids)
        if n:
            now = time.monotonic()
            last, self._last = self._last, now
            c.tokens.observe(n, None if last is None else (now - last) / n)
        if event.outcome is not None:
            self._finish(c, event, event.outcome)

    @staticmethod
    def _finish(c: _TierChildren, event: SchedEvent, outcome: Outcome) -> None:
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


@dataclass(frozen=True, slots=True)
class ModelState:
    """One served model's figures source for the state families."""

    model: str
    stats: Callable[[], ServerStats]
    tokens_per_block: int


class StateCollector(Collector):
    """State families, computed at scrape time from one ServerStats snapshot per model."""

    def __init__(self, models: list[ModelState]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        snapshots = [(m, m.stats()) for m in self._models]
        yield from _backfill_families([(m.model, s) for m, s in snapshots])
        yield from step_budget_families([(m.model, s.scheduler) for m, s in snapshots])
        yield from drafter_families([(m.model, s.executor) for m, s in snapshots])
        yield from _triton_families(snapshots)
        yield from _nvml_families()


def _gauges(name: str, doc: str, values: list[tuple[str, float]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["model"])
    for model, value in values:
        family.add_metric([model], value)
    return family


def _backfill_families(models: list[tuple[str, ServerStats]]) -> Iterator[Metric]:
    slots = GaugeMetricFamily("backfill_slots", "Batch slots by state.", labels=["model", "state"])
    queue = GaugeMetricFamily("backfill_queue_depth", "Requests waiting.", labels=["model", "tier"])
    preempt = CounterMetricFamily(
        "backfill_preemptions", "Sequences preempted (by recompute).", labels=["model", "tier"]
    )
    rate = GaugeMetricFamily(
        "backfill_tier_tokens_per_second", "Generated tokens/s by tier.", labels=["model", "tier"]
    )
    kv = GaugeMetricFamily("backfill_kv_blocks", "KV-cache blocks by state.",
                           labels=["model", "state"])
    steps = CounterMetricFamily("backfill_steps", "Executor iterations.", labels=["model"])
    for model, s in models:
        sched, ex = s.scheduler, s.executor
        slots.add_metric([model, "online"], sched.online.running)
        slots.add_metric([model, "offline"], sched.offline.running)
        slots.add_metric([model, "free"], s.slots_free)
        for tier, t, tps in (
            ("online", sched.online, s.online_tokens_per_second),
            ("offline", sched.offline, s.offline_tokens_per_second),
        ):
            queue.add_metric([model, tier], t.queued)
            preempt.add_metric([model, tier], t.preemptions)
            rate.add_metric([model, tier], tps)
        kv.add_metric([model, "used"], ex.kv_blocks_used)
        kv.add_metric([model, "cached"], ex.kv_blocks_cached)
        kv.add_metric([model, "free"], ex.kv_blocks_free)
        steps.add_metric([model], ex.steps)
    yield from (slots, queue, preempt, rate, kv, steps)
    for name, doc, value in _MODEL_GAUGES:
        yield _gauges(name, doc, [(model, value(s)) for model, s in models])


_MODEL_GAUGES: tuple[tuple[str, str, Callable[[ServerStats], float]], ...] = (
    ("backfill_prefix_cache_hit_ratio", "Cached / prompt tokens since start.",
     lambda s: s.prefix_cache_hit_ratio),
    ("backfill_tokens_per_second", "Generated tokens/s, all tiers.", lambda s: s.tokens_per_second),
    ("backfill_utilization_ratio", "Tokens/s over the engine's profiled peak.",
     lambda s: s.utilization),
    ("backfill_cost_per_million_tokens",
     "The price per hour, in the model's share of the busy time, per million of its tokens.",
     lambda s: s.cost_per_million_tokens),
    ("backfill_slot_occupancy_ratio", "Mean occupied slots / slots.", lambda s: s.slot_occupancy),
    ("backfill_draining", "1 while shutting down.", lambda s: float(s.scheduler.draining)),
    ("backfill_uptime_seconds", "Since the server started.", lambda s: s.uptime_seconds),
    ("backfill_step_tokens", "Tokens computed in the last iteration.",
     lambda s: s.executor.last_step_tokens),
    ("backfill_step_latency_seconds", "Duration of the last iteration.",
     lambda s: s.executor.last_step_latency_s),
)


def _triton_families(models: list[tuple[ModelState, ServerStats]]) -> Iterator[Metric]:
    """Triton's TRT-LLM backend families, with its semantics, so that routers that read Triton
    (the Gateway API Inference Extension's endpoint picker: queue = waiting, running =
    scheduled, KV usage = fraction) read a Backfill server the same way."""
    labels = ["model", "request_type", "version"]
    req = GaugeMetricFamily("nv_trt_llm_request_metrics", "TRT-LLM request metrics", labels=labels)
    kv = GaugeMetricFamily("nv_trt_llm_kv_cache_block_metrics", "TRT-LLM KV cache block metrics",
                           labels=["kv_cache_block_type", "model", "version"])
    for m, s in models:
        sched, ex, model, tokens_per_block = s.scheduler, s.executor, m.model, m.tokens_per_block
        running = sched.online.running + sched.offline.running
        waiting = sched.online.queued + sched.offline.queued + ex.queued
        for kind, value in (
            ("active", running + waiting),
            ("max", s.slots_total),
            ("scheduled", running),
            ("context", getattr(ex, "context_requests", 0)),
            ("waiting", waiting),
        ):
            req.add_metric([model, kind, "1"], value)
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
    yield req
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
