"""Per-tenant metrics keep a bounded number of label values, whatever tenants callers name."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.scheduler.types import Outcome, Tier
from server.tenant_metrics import NONE, OTHER, TenantMetrics

pytestmark = pytest.mark.unit


def _values(registry: CollectorRegistry, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_the_first_tenants_get_labels_and_the_rest_are_other() -> None:
    registry = CollectorRegistry()
    metrics = TenantMetrics(registry, max_tenants=3)
    metrics.register(["known-a", "known-b"])  # the keys file's tenants come first
    for i in range(1000):  # a flood of made-up tenant names
        metrics.finished(f"made-up-{i}", "m", Tier.ONLINE, Outcome.LENGTH, prompt=2,
                         generated=3)
    metrics.finished("known-a", "m", Tier.OFFLINE, Outcome.STOP, prompt=5, generated=7)
    metrics.rejected("known-b", "m", Tier.ONLINE, "max_online_requests")
    metrics.finished("", "m", Tier.ONLINE, Outcome.STOP, prompt=1, generated=1)
    requests = _values(registry, "backfill_tenant_requests_total")
    tenants = {dict(k)["tenant"] for k in requests}
    assert tenants == {"known-a", "known-b", "made-up-0", OTHER}
    m = ("model", "m")
    assert requests[(m, ("outcome", "length"), ("tenant", OTHER), ("tier", "online"))] == 999
    assert requests[(m, ("outcome", "stop"), ("tenant", OTHER), ("tier", "online"))] == 1  # ""
    tokens = _values(registry, "backfill_tenant_tokens_total")
    assert tokens[(("kind", "generated"), m, ("tenant", "known-a"), ("tier", "offline"))] == 7
    quota = _values(registry, "backfill_tenant_quota_rejections_total")
    assert quota == {(m, ("quota", "max_online_requests"), ("tenant", "known-b")): 1}


def test_a_request_without_a_tenant_is_labelled_none() -> None:
    metrics = TenantMetrics(None)
    assert metrics.label("") == NONE
