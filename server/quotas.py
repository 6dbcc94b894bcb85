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
per minute.

Used from the event loop's thread only, so it takes no lock (it runs for every request of a
tenant with quotas): requests are admitted there, and a request's ticket is released there
when its final event reaches the loop (``RequestStream.on_final`` in server/api/streams.py),
not on the scheduler's thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from server.scheduler.types import SchedEvent, SchedRequest, Tier
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

    usage: _Usage  # its tenant's entry (kept while any ticket holds a place in it)
    online: bool  # holds an online place (else an offline one)
    tokens: int  # charged to the bucket when accepted (0: no token quota)
    max_tokens: int  # of the charge, what generating fewer tokens gives back
    released: bool = False

    def release(self, generated: int) -> None:
        """The request ended having generated ``generated`` tokens: gives back its place and
        the tokens it was charged for but did not use. Idempotent."""
        if self.released:
            return
        self.released = True
        usage = self.usage
        if self.online:
            usage.online -= 1
        else:
            usage.offline -= 1
        if self.tokens:
            unused = self.max_tokens - generated
            if unused > 0:
                usage.bucket += unused

    def finish(self, event: SchedEvent) -> None:
        """Releases the ticket with its request's final event."""
        self.release(0 if event.usage is None else event.usage.completion_tokens)


class TenantQuotas:
    """Quota use per tenant. ``job_pending(tenant)``: the tenant's unfinished batch job
    requests (the job runner's count)."""

    MAX_IDLE_TENANTS = 1024

    def __init__(self, job_pending: Callable[[str], int] = lambda tenant: 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._job_pending = job_pending
        self._clock = clock
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
        usage = self._usage.get(tenant)
        if usage is None:
            usage = self._new_usage(tenant)
        if count_limit is not None:
            held = usage.online if online else usage.offline + self._job_pending(tenant)
            if held >= count_limit:
                raise QuotaExceededError(tenant, ONLINE_QUOTA if online else OFFLINE_QUOTA,
                                         count_limit)
        max_tokens = request.sampling.max_tokens
        cost = 0
        if tpm is not None:
            cost = len(request.prompt_token_ids) + max_tokens
            self._take_tokens(usage, tenant, tpm, cost)
        if online:
            usage.online += 1
        else:
            usage.offline += 1
        return Ticket(usage, online, cost, max_tokens)

    def check_job(self, tenant: str, limits: TenantLimits, requests: int) -> None:
        """Whether a batch job of ``requests`` fits the tenant's offline quota."""
        limit = limits.max_queued_offline
        if limit is None:
            return
        usage = self._usage.get(tenant)
        held = (usage.offline if usage is not None else 0) + self._job_pending(tenant)
        if held + requests > limit:
            raise QuotaExceededError(tenant, OFFLINE_QUOTA, limit)

    def in_flight(self, tenant: str) -> tuple[int, int]:
        """(online, offline) requests of the tenant held against its quotas now."""
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
        # refilled since the last charge, up to one minute's worth (NaN: a new bucket, full)
        bucket = usage.bucket + (now - usage.refilled_at) * tpm / 60.0
        if not bucket < tpm:
            bucket = float(tpm)
        usage.refilled_at = now
        usage.tokens_per_minute = tpm
        if bucket <= 0:
            usage.bucket = bucket
            raise QuotaExceededError(tenant, TOKENS_QUOTA, tpm,
                                     retry_after_s=(1.0 - bucket) * 60.0 / tpm)
        usage.bucket = bucket - cost


def _idle(usage: _Usage, now: float) -> bool:
    """Holds nothing, and its token bucket (if any) has refilled: dropping it forgives
    nothing."""
    if usage.online or usage.offline:
        return False
    if math.isnan(usage.bucket):
        return True
    tpm = usage.tokens_per_minute
    return usage.bucket + (now - usage.refilled_at) * tpm / 60.0 >= tpm
