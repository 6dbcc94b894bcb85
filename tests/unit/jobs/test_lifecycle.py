"""A job's life on a running server: tenant isolation, expiry, fairness between jobs, a restart
that resumes unfinished work, and reads that keep working while the server drains."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from backfill.v1 import inference_pb2 as pb
from backfill.v1 import inference_pb2_grpc as pb_grpc
from client import AsyncClient, JobState, NotFound, Unavailable
from client.jobs import openai_line
from tests.fakes import ScriptedExecutor
from tests.unit.server.conftest import MakeServer, is_idle, tiny_capacity, wait_until

pytestmark = pytest.mark.unit


def slow(engine: Path, delay_s: float = 0.003, **limits: int) -> ScriptedExecutor:
    return ScriptedExecutor(tiny_capacity(engine, **limits),
                            step_hook=lambda _: time.sleep(delay_s))


def lines(n: int, max_tokens: int) -> list[dict[str, object]]:
    return [{"id": f"r{i}", "token_ids": [i % 250 + 1, 3], "max_tokens": max_tokens,
             "ignore_eos": True} for i in range(n)]


async def test_a_job_is_visible_to_its_tenant_only(make_server: MakeServer) -> None:
    server = await make_server()
    async with AsyncClient(server.address, tenant="alice") as alice, \
            AsyncClient(server.address, tenant="bob") as bob:
        job = await alice.submit_batch(lines(3, 2))
        assert job.tenant == "alice"
        for call in (bob.get_batch(job.id), bob.cancel_batch(job.id)):
            with pytest.raises(NotFound, match="no batch job"):
                await call
        with pytest.raises(NotFound):
            _ = [r async for r in bob.results(job.id)]
        assert await bob.list_batches() == []
        assert [r.request_id async for r in alice.results(job.id)] == ["r0", "r1", "r2"]
        assert [j.id for j in await alice.list_batches()] == [job.id]


async def test_expiry_keeps_finished_results(make_server: MakeServer, tiny_engine: Path) -> None:
    server = await make_server(slow(tiny_engine, max_slots=2), offline_reserve=0.0)
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(
            [{"id": "quick", "token_ids": [5], "max_tokens": 1}, *lines(30, 2000)],
            completion_window=1.5, labels={"w": "short"})
        states = [s async for s in client.watch(job.id, interval_s=0.05)]
        results = [r async for r in client.results(job.id)]
    final = states[-1]
    assert final.state is JobState.EXPIRED and final.finished_at is not None
    assert (final.completed, final.expired, final.failed, final.cancelled) == (1, 30, 0, 0)
    assert results[0].error is None and results[0].token_ids
    assert all(r.error is not None and r.error.code.name == "DEADLINE_EXCEEDED"
               for r in results[1:])
    # The two running when the window ended keep what they produced; the rest never ran.
    dropped = [r for r in results if not r.token_ids]
    assert len(dropped) == 28
    line = openai_line(job.id, dropped[-1])
    assert line["response"] is None and line["error"]["code"] == "batch_expired"
    await wait_until(lambda: is_idle(server))


async def test_cancel_drops_pending_and_keeps_finished(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    server = await make_server(slow(tiny_engine, max_slots=2), offline_reserve=0.0)
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(
            [{"token_ids": [5], "max_tokens": 1}, *lines(20, 10000)])
        first = await client.results(job.id).__anext__()
        cancelled = await client.cancel_batch(job.id)
        assert cancelled.state is JobState.CANCELLED
        assert (cancelled.completed, cancelled.cancelled) == (1, 20)
        results = [r async for r in client.results(job.id)]
    assert first.error is None and results[0] == first
    assert all(r.error is not None and r.error.code.name == "CANCELLED" for r in results[1:])
    assert openai_line(job.id, results[-1])["error"]["code"] == "batch_cancelled"
    await wait_until(lambda: is_idle(server))


async def test_a_small_job_is_not_held_back_by_a_big_one(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    server = await make_server(slow(tiny_engine, 0.002, max_slots=4), offline_reserve=0.0,
                               job_max_in_flight=8)
    async with AsyncClient(server.address) as client:
        big = await client.submit_batch(lines(200, 4))
        small = await client.submit_batch(lines(6, 4))
        small_results = [r async for r in client.results(small.id)]
        big_results = [r async for r in client.results(big.id)]
    small_end = max(r.finished_at or 0.0 for r in small_results)
    big_before = [r for r in big_results if (r.finished_at or 0.0) <= small_end]
    assert len(small_results) == 6 and len(big_results) == 200
    assert len(big_before) < big.total // 2  # the small job did not wait for the big one


async def test_restart_resumes_unfinished_jobs(
    make_server: MakeServer, tiny_engine: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "shared.db")
    first = await make_server(slow(tiny_engine, max_slots=2), offline_reserve=0.0,
                              job_store=store)
    async with AsyncClient(first.address) as client:
        job = await client.submit_batch(lines(40, 20), idempotency_key="once")
        early = []
        async for result in client.results(job.id):
            early.append(result)
            if len(early) == 5:
                break
    report = await first.stop(grace_s=0.0)
    assert dict(report.unfinished_by_job)[job.id] > 0

    second = await make_server(slow(tiny_engine, max_slots=2), job_store=store)
    async with AsyncClient(second.address) as client:
        again = await client.submit_batch(lines(40, 20), idempotency_key="once")
        assert again.id == job.id  # the key survived the restart
        results = [r async for r in client.results(job.id)]
        done = await client.get_batch(job.id)
    assert [r.index for r in results] == list(range(40))
    assert results[:5] == early
    assert all(len(r.token_ids) == 20 for r in results)
    assert done.state is JobState.COMPLETED and done.completed == 40


async def test_job_reads_keep_working_while_draining(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    server = await make_server(slow(tiny_engine, 0.01))
    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(lines(3, 2))
        _ = [r async for r in client.results(job.id)]
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            online = stub.Generate(pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingParams(max_tokens=60)))
            await online.read()
            stopping = asyncio.ensure_future(server.stop(grace_s=10.0))
            await wait_until(lambda: server.scheduler.snapshot().draining)
            assert (await client.get_batch(job.id)).state is JobState.COMPLETED
            assert len([r async for r in client.results(job.id)]) == 3
            assert [j.id for j in await client.list_batches()] == [job.id]
            with pytest.raises(Unavailable):
                await client.submit_batch(lines(1, 1))
            online.cancel()
        await stopping


async def test_the_scheduler_holds_at_most_max_in_flight_job_requests(
    make_server: MakeServer, tiny_engine: Path
) -> None:
    server = await make_server(slow(tiny_engine, 0.001, max_slots=4), job_max_in_flight=6)
    most = 0

    def in_scheduler() -> int:
        offline = server.scheduler.snapshot().offline
        return offline.running + offline.queued

    async with AsyncClient(server.address) as client:
        job = await client.submit_batch(lines(60, 3))
        async for _ in client.results(job.id):
            most = max(most, in_scheduler())
    assert 4 <= most <= 6


async def test_finished_jobs_are_deleted_after_their_retention(
    make_server: MakeServer, tmp_path: Path
) -> None:
    store = str(tmp_path / "retained.db")
    first = await make_server(job_store=store, job_retention_s=0.3)
    async with AsyncClient(first.address) as client:
        job = await client.submit_batch(lines(2, 2))
        _ = [r async for r in client.results(job.id)]
        assert (await client.get_batch(job.id)).done
    await first.stop(grace_s=0.0)
    await asyncio.sleep(0.4)
    second = await make_server(job_store=store, job_retention_s=0.3)  # purges at start
    async with AsyncClient(second.address) as client:
        with pytest.raises(NotFound):
            await client.get_batch(job.id)


async def test_a_job_whose_window_ended_while_the_server_was_down_expires(
    make_server: MakeServer, tiny_engine: Path, tmp_path: Path
) -> None:
    store = str(tmp_path / "late.db")
    first = await make_server(slow(tiny_engine, max_slots=1), job_store=store)
    async with AsyncClient(first.address) as client:
        job = await client.submit_batch([{"token_ids": [5], "max_tokens": 1}, *lines(9, 2000)],
                                        completion_window=1.5)
        first_result = await client.results(job.id).__anext__()
        assert first_result.error is None
    await first.stop(grace_s=0.0)
    await asyncio.sleep(1.6)
    second = await make_server(slow(tiny_engine, max_slots=1), job_store=store)
    async with AsyncClient(second.address) as client:
        final = [s async for s in client.watch(job.id, interval_s=0.05)][-1]
    assert final.state is JobState.EXPIRED
    assert (final.completed, final.expired) == (1, 9)
