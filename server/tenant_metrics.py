"""Per-tenant counters with bounded label cardinality: the first ``max_tenants`` tenants seen
(the keys file's tenants first, registered when it is loaded) get a label of their own, every
other tenant is counted as ``(other)``, so a stream of made-up tenant names cannot grow the
metrics without bound. A request without a tenant is ``(none)``.

Families: ``backfill_tenant_requests_total{tenant,model,tier,outcome}`` (outcome ``rejected``
for a request refused at submit),
``backfill_tenant_tokens_total{tenant,model,tier,kind=prompt|generated}``,
``backfill_tenant_quota_rejections_total{tenant,model,quota}``, and
``backfill_auth_failures_total{surface,reason}`` (no model: credentials are checked before a
request names one). Counts are plain numbers under one lock,
exported at scrape time (one lock per finished request on the scheduler's thread).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from server.scheduler.types import Outcome, Tier

OTHER = "(other)"
NONE = "(none)"
REJECTED = "rejected"
DEFAULT_MAX_TENANTS = 32


class TenantMetrics(Collector):
    def __init__(self, registry: CollectorRegistry | None,
                 max_tenants: int = DEFAULT_MAX_TENANTS) -> None:
        self._lock = threading.Lock()
        self._max = max_tenants
        self._labels: dict[str, str] = {}
        self._requests: Counter[tuple[str, str, str, str]] = Counter()
        self._tokens: Counter[tuple[str, str, str, str]] = Counter()
        self._quota: Counter[tuple[str, str, str]] = Counter()
        self._auth: Counter[tuple[str, str]] = Counter()
        if registry is not None:
            registry.register(self)

    def register(self, tenants: Iterable[str]) -> None:
        """Gives these tenants labels of their own first (while there is room)."""
        with self._lock:
            for tenant in tenants:
                self._label(tenant)

    def label(self, tenant: str) -> str:
        with self._lock:
            return self._label(tenant)

    def finished(self, tenant: str, model: str, tier: Tier, outcome: Outcome, prompt: int,
                 generated: int) -> None:
        with self._lock:
            label = self._label(tenant)
            self._requests[label, model, tier.value, outcome.value] += 1
            self._tokens[label, model, tier.value, "prompt"] += prompt
            self._tokens[label, model, tier.value, "generated"] += generated

    def rejected(self, tenant: str, model: str, tier: Tier, quota: str | None = None) -> None:
        """A request refused at submit; ``quota``: the tenant quota that refused it."""
        with self._lock:
            label = self._label(tenant)
            self._requests[label, model, tier.value, REJECTED] += 1
            if quota is not None:
                self._quota[label, model, quota] += 1

    def auth_failure(self, surface: str, reason: str) -> None:
        with self._lock:
            self._auth[surface, reason] += 1

    def _label(self, tenant: str) -> str:
        label = self._labels.get(tenant)
        if label is None:
            if len(self._labels) >= self._max:
                return OTHER
            label = self._labels[tenant] = tenant or NONE
        return label

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            requests, tokens = dict(self._requests), dict(self._tokens)
            quota, auth = dict(self._quota), dict(self._auth)
        yield _family("backfill_tenant_requests", "Requests by tenant and final outcome.",
                      ["tenant", "model", "tier", "outcome"], requests)
        yield _family("backfill_tenant_tokens", "Prompt and generated tokens by tenant.",
                      ["tenant", "model", "tier", "kind"], tokens)
        yield _family("backfill_tenant_quota_rejections", "Requests refused by a tenant quota.",
                      ["tenant", "model", "quota"], quota)
        yield _family("backfill_auth_failures", "Calls refused for missing or bad credentials.",
                      ["surface", "reason"], auth)


def _family(name: str, doc: str, labels: list[str],
            values: Mapping[Any, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
