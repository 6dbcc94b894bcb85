"""Per-tenant quotas (server/quotas.py), on their own with a fake clock and through a server:
each refusal is RESOURCE_EXHAUSTED (HTTP 429) naming the quota, other tenants are unaffected,
and a tenant's place is given back when its requests end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from server.executor.base import SamplingParams
from server.quotas import QuotaExceededError, TenantQuotas
from server.scheduler.types import Outcome, SchedEvent, SchedRequest, Tier, Usage
from server.security.keys import TenantLimits
from tests.fakes import ScriptedExecutor
from tests.unit.scheduler.helpers import FakeClock
from tests.unit.server.conftest import MakeServer, is_idle, scrape, tiny_capacity, wait_until
from tests.unit.server.tenants import KEY_A, KEY_B, bearer, http_async, request, write_keys

M = ("model", "tiny-llama")  # the label every engine figure carries
pytestmark = pytest.mark.unit


def sched(tenant: str, tier: Tier = Tier.ONLINE, prompt: int = 10, max_tokens: int = 20
          ) -> SchedRequest:
    return SchedRequest(tuple(range(prompt)), SamplingParams(max_tokens=max_tokens), tier,
                        tenant=tenant)


def test_online_requests_in_flight_are_bounded_per_tenant() -> None:
    quotas = TenantQuotas()
    limits = TenantLimits(max_online_requests=2)
    held = [quotas.admit(sched("a"), limits) for _ in range(2)]
    with pytest.raises(QuotaExceededError, match="tenant 'a' is at its max_online_requests"):
        quotas.admit(sched("a"), limits)
    assert quotas.admit(sched("b"), limits) is not None  # another tenant's own count
    assert quotas.admit(sched("a", Tier.OFFLINE), limits) is None  # offline: not this quota
    ticket = held[0]
    assert ticket is not None
    ticket.release(5)
    ticket.release(5)  # idempotent
    assert quotas.in_flight("a") == (1, 0)
    assert quotas.admit(sched("a"), limits) is not None


def test_queued_offline_counts_batch_job_requests_too() -> None:
    pending = {"a": 3}
    quotas = TenantQuotas(lambda tenant: pending.get(tenant, 0))
    limits = TenantLimits(max_queued_offline=5)
    quotas.admit(sched("a", Tier.OFFLINE), limits)
    quotas.check_job("a", limits, 1)
    with pytest.raises(QuotaExceededError, match="max_queued_offline quota \\(5\\)"):
        quotas.check_job("a", limits, 2)
    quotas.admit(sched("a", Tier.OFFLINE), limits)
    with pytest.raises(QuotaExceededError):
        quotas.admit(sched("a", Tier.OFFLINE), limits)
    pending["a"] = 0
    quotas.admit(sched("a", Tier.OFFLINE), limits)


def test_tokens_per_minute_is_a_refilling_bucket_with_refunds() -> None:
    clock = FakeClock(100.0)
    quotas = TenantQuotas(clock=clock)
    limits = TenantLimits(tokens_per_minute=60)  # a token a second
    first = quotas.admit(sched("a", prompt=10, max_tokens=40), limits)  # 50 of 60
    quotas.admit(sched("a", prompt=10, max_tokens=40), limits)  # 10 left: may go below zero
    with pytest.raises(QuotaExceededError) as info:
        quotas.admit(sched("a", prompt=1, max_tokens=1), limits)
    assert info.value.quota == "tokens_per_minute" and info.value.retry_after_s == 41.0
    assert first is not None
    first.release(10)  # 30 of its 40 unused come back: -40 + 30 = -10
    clock.advance(10.5)
    assert quotas.admit(sched("a", prompt=1, max_tokens=1), limits) is not None
    clock.advance(1000)  # refills to one minute's worth, not more
    quotas.admit(sched("a", prompt=30, max_tokens=30), limits)
    with pytest.raises(QuotaExceededError):
        quotas.admit(sched("a", prompt=1, max_tokens=1), limits)


def test_idle_tenants_are_forgotten_but_not_their_debts() -> None:
    """Entries of tenants that hold nothing stay (no churn per request) until there are
    MAX_IDLE_TENANTS of them; then the idle ones go, except a bucket still refilling."""
    clock = FakeClock(100.0)
    quotas = TenantQuotas(clock=clock)
    quotas.MAX_IDLE_TENANTS = 4
    counted = TenantLimits(max_online_requests=5)
    metered = TenantLimits(tokens_per_minute=60)
    ticket = quotas.admit(sched("debtor", prompt=100, max_tokens=20), metered)  # 60 - 120
    assert ticket is not None
    ticket.release(20)  # -60: two minutes to refill
    for tenant in ("b", "c", "d"):
        done = quotas.admit(sched(tenant), counted)
        assert done is not None
        done.release(1)
    assert set(quotas._usage) == {"debtor", "b", "c", "d"}  # kept while there is room
    clock.advance(50.0)
    kept = quotas.admit(sched("e"), counted)  # the fifth: the idle ones are dropped
    assert kept is not None
    assert set(quotas._usage) == {"debtor", "e"}
    with pytest.raises(QuotaExceededError):  # -60 + 50: still in debt, not forgiven
        quotas.admit(sched("debtor", prompt=1, max_tokens=1), metered)


def test_a_final_event_releases_its_ticket_with_the_unused_tokens() -> None:
    clock = FakeClock(100.0)
    quotas = TenantQuotas(clock=clock)
    limits = TenantLimits(max_online_requests=1, tokens_per_minute=60)
    ticket = quotas.admit(sched("a", prompt=10, max_tokens=40), limits)  # 10 of 60 left
    assert ticket is not None
    with pytest.raises(QuotaExceededError, match="max_online_requests"):
        quotas.admit(sched("a", prompt=1, max_tokens=1), limits)
    usage = Usage(prompt_tokens=10, completion_tokens=5, cached_prompt_tokens=0)
    ticket.finish(SchedEvent(request_id=1, token_ids=(), text="", outcome=Outcome.STOP,
                             usage=usage))
    ticket.finish(SchedEvent(request_id=1, token_ids=(), text="", outcome=Outcome.STOP))
    assert quotas.in_flight("a") == (0, 0)  # once, though finished twice
    # 35 of the 40 come back (10 + 35 = 45 left); no time passes, so nothing else refills
    assert quotas.admit(sched("a", prompt=5, max_tokens=40), limits) is not None
    with pytest.raises(QuotaExceededError, match="max_online_requests"):
        quotas.admit(sched("a", prompt=1, max_tokens=1), limits)


def test_no_quotas_no_bookkeeping() -> None:
    quotas = TenantQuotas()
    assert quotas.admit(sched("a"), TenantLimits(weight=3.0)) is None


# ---- through a server ---------------------------------------------------------------------------


@pytest.fixture
async def server_with_quotas(make_server: MakeServer, tiny_engine: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    limits = {"a": TenantLimits(max_online_requests=2, max_queued_offline=4,
                                tokens_per_minute=100_000)}
    keys = write_keys(tmp_path / "keys.json", limits)
    # 2 ms a step: a request of 10,000 tokens (capped at the context) lives for seconds
    executor = ScriptedExecutor(tiny_capacity(tiny_engine), step_hook=lambda _: time.sleep(0.002))
    return await make_server(executor, auth_keys=str(keys), http_port=0, metrics_port=0)


async def test_over_quota_is_resource_exhausted_naming_it_and_others_go_on(
    server_with_quotas,  # type: ignore[no-untyped-def]
) -> None:
    server = server_with_quotas
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        long = request(sampling=pb.SamplingParams(max_tokens=10_000))
        calls = [stub.Generate(long, metadata=bearer(KEY_A)) for _ in range(2)]
        for call in calls:
            await call.read()  # both running
        with pytest.raises(grpc.aio.AioRpcError) as info:
            _ = [c async for c in stub.Generate(long, metadata=bearer(KEY_A))]
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'a' is at its max_online_requests quota (2)" in (
            info.value.details() or "")
        other = [c async for c in stub.Generate(request(), metadata=bearer(KEY_B))]
        assert other[-1].finish_reason == pb.FINISH_REASON_LENGTH
        for call in calls:
            call.cancel()
        await wait_until(lambda: server_quotas(server).in_flight("a") == (0, 0))
        again = [c async for c in stub.Generate(request(), metadata=bearer(KEY_A))]
        assert again[-1].finish_reason == pb.FINISH_REASON_LENGTH
        # offline: a job that would take a past 4 queued offline requests is refused whole
        job = stub.SubmitBatch(pb.SubmitBatchRequest(requests=[request()] * 5),
                               metadata=bearer(KEY_A))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await job
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queued_offline" in (info.value.details() or "")
        listed = await stub.ListBatches(pb.ListBatchesRequest(), metadata=bearer(KEY_A))
        assert list(listed.jobs) == []  # nothing was left behind
    await wait_until(lambda: is_idle(server))
    assert server.metrics_url is not None
    m = await scrape(server.metrics_url)
    rejected = m["backfill_tenant_quota_rejections_total"]
    assert rejected[(M, ("quota", "max_online_requests"), ("tenant", "a"))] == 1
    assert m["backfill_tenant_requests_total"][
        (M, ("outcome", "length"), ("tenant", "b"), ("tier", "online"))] == 1


async def test_a_session_that_breaks_gives_back_its_requests_places(
    server_with_quotas,  # type: ignore[no-untyped-def]
) -> None:
    """Places are given back when the requests' final events reach the loop, though the
    Session that opened them is gone and nothing takes those events."""
    server = server_with_quotas
    long = pb.SamplingParams(max_tokens=10_000)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        session = stub.Session(metadata=bearer(KEY_A))
        for cid in ("r1", "r2"):
            await session.write(pb.SessionRequest(
                generate=request(client_request_id=cid, sampling=long)))
        await session.read()
        await wait_until(lambda: server_quotas(server).in_flight("a") == (2, 0))
        session.cancel()
        await wait_until(lambda: server_quotas(server).in_flight("a") == (0, 0))
        again = [c async for c in stub.Generate(request(), metadata=bearer(KEY_A))]
        assert again[-1].finish_reason == pb.FINISH_REASON_LENGTH


def server_quotas(server) -> TenantQuotas:  # type: ignore[no-untyped-def]
    return server._servicer._quotas  # type: ignore[no-any-return]


async def test_http_over_quota_is_429_with_retry_after(
    make_server: MakeServer, tmp_path: Path
) -> None:
    keys = write_keys(tmp_path / "keys.json", {"a": TenantLimits(tokens_per_minute=50)})
    server = await make_server(auth_keys=str(keys), http_port=0)
    assert server.http_port is not None
    headers = {"authorization": f"Bearer {KEY_A}"}
    body = {"prompt": [1, 2, 3], "max_tokens": 60}
    first = await http_async(server.http_port, "POST", "/v1/completions", headers=headers,
                             body=body)
    assert first[0] == 200
    status, response_headers, raw = await http_async(server.http_port, "POST", "/v1/completions",
                                                     headers=headers, body=body)
    assert status == 429
    assert int(response_headers["retry-after"]) >= 1
    error = json.loads(raw)["error"]
    assert error["type"] == "rate_limit_error" and "tokens_per_minute" in error["message"]
