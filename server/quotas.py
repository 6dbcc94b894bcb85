"""Per-tenant quotas from the keys file, checked when a request is accepted:

- ``max_online_requests``: online requests in flight (accepted, not finished) at once;
- ``max_queued_offline``: offline requests accepted and not finished: offline-tier requests
  plus the unfinished requests of the tenant's batch jobs (a job that would go over is
  refused whole);
- ``tokens_per_minute``: a token bucket (capacity one minute's worth, refilled continuously)
  over the prompt and generated tokens of Generate, Session and HTTP requests. A request is
  charged its prompt plus ``max_tokens`` when accepted and refunded what it did not generate
  when it ends; it is accepted while the bucket is not empty, so one request may take the
  bucket below zero and the next waits until it refills.

A refusal is RESOURCE_EXHAUSTED (HTTP 429) naming the tenant, the quota and its value. Batch
jobs are bounded by ``max_queued_offline`` and share the offline tier by weight, not by tokens
per minute. Thread-safe: tickets are released from the scheduler's thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.scheduler.types import SchedRequest, Tier
from server.security.keys import TenantLimits

ONLINE_QUOTA = "max_online_requests"
OFFLINE_QUOTA = "max_queued_offline"
TOKENS_QUOTA = "tokens_per_minute"


class QuotaExceededError(Exception):
    """A tenant is at one of its quotas; the surfaces answer RESOURCE_EXHAUSTED (HTTP 429)."""

    def __init__(self, tenant: str, quota: str, limit: int, retry_after_s: float | None = None):
        again = "" if retry_after_s is None else f"; retry in {retry_after_s:.1f}s"
        super().__init__(f"tenant {tenant!r} is at its {quota} quota ({limit}){again}")
        self.tenant = tenant
        self.quota = quota
        self.retry_after_s = retry_after_s


@dataclass(slots=True)
class _Usage:
    online: int = 0
    offline: int = 0
    bucket: float = math.nan  # tokens available; NaN until the tenant's first request
    refilled_at: float = 0.0
    tokens_per_minute: int = 0  # the bucket's size and refill rate, as last charged


@dataclass(slots=True)
class Ticket:
    """What an accepted request holds against its tenant's quotas until it ends."""

    tenant: str
    tier: Tier
    tokens: int  # charged to the bucket when accepted (0: no token quota)
    max_tokens: int  # of the charge, what generating fewer tokens gives back
    released: bool = False


class TenantQuotas:
    """Quota use per tenant. ``job_pending(tenant)``: the tenant's unfinished batch job
    requests (the job runner's count)."""

    MAX_IDLE_TENANTS = 1024

    def __init__(self, job_pending: Callable[[str], int] = lambda tenant: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._job_pending = job_pending
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _Usage] = {}

    def admit(self, request: SchedRequest, limits: TenantLimits) -> Ticket | None:
        """Takes one request's share of its tenant's quotas (QuotaExceededError if over);
        None when the tenant has no quota to hold it against."""
        online = request.tier is Tier.ONLINE
        count_limit = limits.max_online_requests if online else limits.max_queued_offline
        tpm = limits.tokens_per_minute
        if count_limit is None and tpm is None:
            return None
        tenant = request.tenant
        cost = len(request.prompt_token_ids) + request.sampling.max_tokens if tpm else 0
        with self._lock:
            usage = self._usage.get(tenant)
            if usage is None:
                usage = self._new_usage(tenant)
            held = usage.online if online else usage.offline
            if not online:
                held += self._job_pending(tenant)
            if count_limit is not None and held >= count_limit:
                raise QuotaExceededError(tenant, ONLINE_QUOTA if online else OFFLINE_QUOTA,
                                         count_limit)
            if tpm is not None:
                self._take_tokens(usage, tenant, tpm, cost)
            if online:
                usage.online += 1
            else:
                usage.offline += 1
        return Ticket(tenant, request.tier, cost, request.sampling.max_tokens)

    def check_job(self, tenant: str, limits: TenantLimits, requests: int) -> None:
        """Whether a batch job of ``requests`` fits the tenant's offline quota."""
        limit = limits.max_queued_offline
        if limit is None:
            return
        with self._lock:
            usage = self._usage.get(tenant)
            held = (usage.offline if usage is not None else 0) + self._job_pending(tenant)
        if held + requests > limit:
            raise QuotaExceededError(tenant, OFFLINE_QUOTA, limit)

    def release(self, ticket: Ticket, generated: int) -> None:
        """The request ended having generated ``generated`` tokens: gives back its place and
        the tokens it was charged for but did not use. Idempotent."""
        with self._lock:
            if ticket.released:
                return
            ticket.released = True
            usage = self._usage[ticket.tenant]
            if ticket.tier is Tier.ONLINE:
                usage.online -= 1
            else:
                usage.offline -= 1
            if ticket.tokens:
                usage.bucket += max(0, ticket.max_tokens - generated)

    def in_flight(self, tenant: str) -> tuple[int, int]:
        """(online, offline) requests of the tenant held against its quotas now."""
        with self._lock:
            usage = self._usage.get(tenant)
            return (0, 0) if usage is None else (usage.online, usage.offline)

    def _new_usage(self, tenant: str) -> _Usage:
        """A tenant's entry, kept while it is used (so that a tenant whose requests come
        one at a time does not make and drop it on every request); idle ones are dropped
        once there are MAX_IDLE_TENANTS of them."""
        if len(self._usage) >= self.MAX_IDLE_TENANTS:
            now = self._clock()
            self._usage = {t: u for t, u in self._usage.items() if not _idle(u, now)}
        usage = self._usage[tenant] = _Usage()
        return usage

    def _take_tokens(self, usage: _Usage, tenant: str, tpm: int, cost: int) -> None:
        now = self._clock()
        if math.isnan(usage.bucket):
            usage.bucket = float(tpm)
        else:
            rate = tpm / 60.0
            usage.bucket = min(float(tpm), usage.bucket + (now - usage.refilled_at) * rate)
        usage.refilled_at = now
        usage.tokens_per_minute = tpm
        if usage.bucket <= 0:
            wait = (1.0 - usage.bucket) / (tpm / 60.0)
            raise QuotaExceededError(tenant, TOKENS_QUOTA, tpm, retry_after_s=wait)
        usage.bucket -= cost


def _idle(usage: _Usage, now: float) -> bool:
    """Holds nothing, and its token bucket (if any) has refilled: dropping it forgives
    nothing."""
    if usage.online or usage.offline:
        return False
    if math.isnan(usage.bucket):
        return True
    tpm = usage.tokens_per_minute
    return usage.bucket + (now - usage.refilled_at) * tpm / 60.0 >= tpm
